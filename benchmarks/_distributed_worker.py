"""One process of ``fastcontrast bench --suite distributed`` (started by
benchmarks/distributed_targets.py, which reads what it writes).

    python benchmarks/_distributed_worker.py < spec.json   # writes spec["result_path"]

Spec mode "losses" (one rank of a gloo world on 127.0.0.1; spec: world, rank, port, n, d, impls,
rounds, timeout_s): symmetric CLIP on this rank's N / W rows of the global batch
(benchmarks/families.py's clip inputs, global N x D, rows of rank r = r-th block) for every
implementation in ``impls``:

    ring / gather   fastcontrast.distributed.clip_loss(..., mode=...)
    open_clip       OpenCLIP ClipLoss(local_loss=True, gather_with_grad=True, rank, world_size)

In this order: torch threads = 1; a warm-up of each implementation at 256 rows per rank; per
implementation one measured forward+backward (its loss, its peak extra memory: VmHWM reset,
worker.MemoryProbe; its bytes sent: ByteCounter below), the ring and gather ones once more at
D / 2 (key memory, see distributed_targets.py); then ``rounds`` timed forward+backward rounds,
each running every implementation once (the order rotated from round to round), a barrier
before every step. Every collective of the harness and the losses times out after timeout_s.

Spec mode "gradcache" (one process, no process group; spec: n, chunk, image): a small CNN
(``cnn``) embeds two views of n images; the same step by fastcontrast.gradcache.gradcache_step
with ``chunk`` samples per chunk and plainly (the whole batch with a graph), each one measured
forward+backward (peak extra memory, time), their losses and parameter gradients compared.
"""
import contextlib
import json
import sys
import time
from datetime import timedelta

if __package__ in (None, ""):  # run as a script: sys.path[0] is this folder
    import _bootstrap

    _bootstrap.ensure_package()

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from fastcontrast.benchmarks import families as fam  # noqa: E402
from fastcontrast.benchmarks import peers  # noqa: E402
from fastcontrast.benchmarks.worker import MemoryProbe, timer, trim_heap  # noqa: E402

WARMUP_ROWS = 256
CPU = torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Bytes sent


def _nbytes(t):
    return t.numel() * t.element_size()


def _world(kwargs):
    return dist.get_world_size(kwargs.get("group"))


def _others(tensors, kwargs):
    """Bytes of a per-rank list except this rank's own entry."""
    mine = dist.get_rank(kwargs.get("group"))
    return sum(_nbytes(t) for i, t in enumerate(tensors or ()) if i != mine)


# What one rank sends in each collective under its bandwidth-optimal algorithm (ring
# all-gather / reduce-scatter, ring all-reduce), as a function of the call's arguments.
COSTS = {
    "all_gather": lambda out, t, **kw: (_world(kw) - 1) * _nbytes(t),
    "all_gather_into_tensor": lambda out, t, **kw: (_world(kw) - 1) * _nbytes(t),
    "all_reduce": lambda t, **kw: 2 * (_world(kw) - 1) * _nbytes(t) // _world(kw),
    "reduce_scatter": lambda out, parts, **kw: (_world(kw) - 1) * _nbytes(out),
    "reduce_scatter_tensor": lambda out, t, **kw: (_world(kw) - 1) * _nbytes(out),
    "all_to_all": lambda outs, ins, **kw: _others(ins, kw),
    "scatter": lambda out, parts=None, src=0, **kw: _others(parts, kw),
    "batch_isend_irecv": lambda ops: sum(_nbytes(op.tensor) for op in ops
                                         if op.op is dist.isend),
}


class ByteCounter:
    """Counts the bytes this rank sends (COSTS) in the torch.distributed calls made inside
    ``with counter.counting():`` (every module that calls them as ``dist.<name>`` is seen:
    fastcontrast.distributed and torch.distributed.nn, which OpenCLIP uses)."""

    def __init__(self):
        self.bytes, self.calls = 0, {}

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            self.bytes += int(COSTS[name](*args, **kwargs))
            self.calls[name] = self.calls.get(name, 0) + 1
            return original(*args, **kwargs)
        return counted

    @contextlib.contextmanager
    def counting(self):
        saved = {name: getattr(dist, name) for name in COSTS if hasattr(dist, name)}
        try:
            for name, original in saved.items():
                setattr(dist, name, self._wrap(name, original))
            yield self
        finally:
            for name, original in saved.items():
                setattr(dist, name, original)


# ---------------------------------------------------------------------------------------------
# The losses


def make_loss(impl, rank, world):
    """loss(image, text) of this rank for one implementation name."""
    if impl in ("ring", "gather"):
        from fastcontrast import distributed as fcd

        return lambda image, text: fcd.clip_loss(image, text, fam.CLIP_SCALE, mode=impl)
    if impl == "open_clip":
        cls, reason = peers.load_peer("open_clip ClipLoss")
        if cls is None:
            raise ImportError(reason)
        loss = cls(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        return lambda image, text: loss(image, text, torch.tensor(fam.CLIP_SCALE))
    raise ValueError(f"unknown implementation {impl!r} (ring, gather, open_clip)")


def local_inputs(n, d, rank, world, seed=0):
    """This rank's rows of the global clip inputs (families.py) of N = n, as grad leaves."""
    inputs = fam.FAMILIES["clip"].make_inputs(fam.Problem(n=n, d=d, seed=seed))
    rows = n // world
    return {name: t.detach()[rank * rows:(rank + 1) * rows].clone().requires_grad_()
            for name, t in inputs.items()}


def _step(loss_fn, inputs):
    def step():
        loss = loss_fn(**inputs)
        torch.autograd.grad(loss, list(inputs.values()))
        return loss
    return step


def measured_run(step):
    """One forward+backward: its loss, peak extra memory (this process), bytes sent, time."""
    trim_heap()
    dist.barrier()
    probe, counter = MemoryProbe(CPU), ByteCounter()
    probe.start()
    t0 = time.perf_counter()
    with counter.counting():
        loss = step()
    seconds = time.perf_counter() - t0
    out = {**probe.stop(), "bytes_sent": counter.bytes, "calls": counter.calls,
           "cold_s": seconds, "loss": float(loss.detach())}
    del loss
    return out


def run_losses(spec):
    torch.set_num_threads(1)
    world, rank = spec["world"], spec["rank"]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{spec['port']}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=spec["timeout_s"]))
    try:
        impls = list(spec["impls"])
        fns = {impl: make_loss(impl, rank, world) for impl in impls}
        small = local_inputs(WARMUP_ROWS * world, spec["d"], rank, world, seed=1)
        for impl in impls:
            _step(fns[impl], small)()
        inputs = local_inputs(spec["n"], spec["d"], rank, world)
        steps = {impl: _step(fns[impl], inputs) for impl in impls}
        result = {"rank": rank, "world": world, "threads": torch.get_num_threads(),
                  "impls": {}, "half_d": {}}
        for impl in impls:
            result["impls"][impl] = measured_run(steps[impl])
        half = local_inputs(spec["n"], spec["d"] // 2, rank, world)
        for impl in impls:
            if impl in ("ring", "gather"):
                result["half_d"][impl] = measured_run(_step(fns[impl], half))
        del half
        trim_heap()
        clock = timer(CPU)
        samples = {impl: [] for impl in impls}
        for round_ in range(spec["rounds"]):
            for j in range(len(impls)):
                impl = impls[(j + round_) % len(impls)]
                dist.barrier()
                samples[impl].append(clock(steps[impl]))
        for impl in impls:
            result["impls"][impl]["samples_s"] = samples[impl]
        dist.barrier()
        return result
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Gradient caching


def cnn(dim=128, seed=0):
    """A small CNN encoder: 3 x 32 x 32 images -> L2-normalised (dim,) embeddings."""
    torch.manual_seed(seed)
    body = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, dim))
    return nn.Sequential(body, _Normalize())


class _Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1)


def run_gradcache(spec):
    import fastcontrast
    from fastcontrast.gradcache import gradcache_step

    n, chunk, size = spec["n"], spec["chunk"], spec.get("image", 32)
    model = cnn()
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(n, 3, size, size, generator=gen) for _ in range(2)]

    def loss_fn(a, b):
        return fastcontrast.clip_loss(a, b, fam.CLIP_SCALE)

    def cached():
        return gradcache_step((model, model), views, loss_fn, chunk_size=chunk)

    def plain():
        loss = loss_fn(model(views[0]), model(views[1]))
        loss.backward()
        return loss.detach()

    result = {"n": n, "chunk": chunk, "threads": torch.get_num_threads(), "runs": {}}
    small = [v[:2 * chunk] for v in views]
    gradcache_step((model, model), small, loss_fn, chunk_size=chunk)  # warm-up
    grads = {}
    for name, step in (("gradcache", cached), ("plain", plain)):
        model.zero_grad(set_to_none=True)
        trim_heap()
        probe = MemoryProbe(CPU)
        probe.start()
        t0 = time.perf_counter()
        loss = step()
        result["runs"][name] = {**probe.stop(), "seconds": time.perf_counter() - t0,
                                "loss": float(loss)}
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
    diff = (grads["gradcache"] - grads["plain"]).norm() / grads["plain"].norm()
    result["grad_rel_diff"] = float(diff)
    return result


def main():
    spec = json.loads(sys.stdin.read())
    result = run_losses(spec) if spec["mode"] == "losses" else run_gradcache(spec)
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
