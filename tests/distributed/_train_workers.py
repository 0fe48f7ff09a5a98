"""Shared pieces of the gradcache and training tests: a tiny tower, and ONE spawn of W = 2 gloo
processes (per test session) that runs every W = 2 case of those tests, so the distributed
tests pay one process start-up. ``world2_results()`` returns what the ranks computed plus the
single-process references."""
import functools

import torch
import torch.distributed as dist
from torch import nn

WORLD = 2
SPAWN_TIMEOUT_S = 240  # a safety net for a loaded machine: each collective times out at 30 s
COLLECTIVE_TIMEOUT_S = 30


class TinyTower(nn.Module):
    """Linear - tanh - dropout - linear: per-sample (no batch statistics), with dropout."""

    def __init__(self, d_in, d_out, dropout=0.1, hidden=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(hidden, d_out))

    def forward(self, x):
        return self.net(x)


class _GatherAll(torch.autograd.Function):
    """all_gather with the gradient of the sum over ranks (all_reduce, then own slice)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.n, ctx.rank = x.shape[0], dist.get_rank()
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def distributed_clip(image, text, scale, mode):
    """The loss of the gathered batch: fastcontrast.distributed when it is there, else the
    whole-batch loss on every rank (same convention: mean over ranks = global loss)."""
    import fastcontrast as fc

    try:
        from fastcontrast import distributed as fcd
    except ImportError:
        fcd = None
    if fcd is not None and mode != "fallback":
        return fcd.clip_loss(image, text, scale, mode=mode)
    return fc.clip_loss(_GatherAll.apply(image), _GatherAll.apply(text), scale,
                        backend="reference")


def has_fcd():
    try:
        from fastcontrast import distributed  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# GradCache under DDP

GC_N, GC_CHUNK, GC_SEEDS = 24, 5, (11, 12)


def gradcache_problem():
    torch.manual_seed(0)
    image, text = TinyTower(12, 8, dropout=0.2).double(), TinyTower(10, 8, dropout=0.3).double()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    x, t = torch.randn(GC_N, 12, dtype=torch.float64), torch.randn(GC_N, 10, dtype=torch.float64)
    return image, text, scale, x, t


def gradcache_reference():
    """Single process, full batch: rank r's chunks forwarded from seed GC_SEEDS[r] (the
    generator each rank starts from), all embeddings concatenated, one backward."""
    import fastcontrast as fc
    from fastcontrast.gradcache import split_chunks

    image, text, scale, x, t = gradcache_problem()
    half = GC_N // WORLD
    imgs, txts = [], []
    for r in range(WORLD):
        torch.manual_seed(GC_SEEDS[r])
        imgs += [image(c) for c in split_chunks(x[r * half:(r + 1) * half], GC_CHUNK)]
        txts += [text(c) for c in split_chunks(t[r * half:(r + 1) * half], GC_CHUNK)]
    loss = fc.clip_loss(torch.cat(imgs), torch.cat(txts), scale, backend="reference")
    loss.backward()
    grads = [p.grad for p in list(image.parameters()) + list(text.parameters())] + [scale.grad]
    return {"loss": float(loss.detach()), "grads": grads}


def _gradcache_case(rank, mode):
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from fastcontrast.gradcache import gradcache_step

    image, text, scale, x, t = gradcache_problem()
    calls = {"n": 0}

    def hook(state, bucket):
        calls["n"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    towers = [DDP(image), DDP(text)]
    for tower in towers:
        tower.register_comm_hook(None, hook)
    half = GC_N // WORLD
    mine = slice(rank * half, (rank + 1) * half)
    torch.manual_seed(GC_SEEDS[rank])
    loss = gradcache_step(towers, (x[mine], t[mine]),
                          lambda a, b: distributed_clip(a, b, scale, mode),
                          chunk_size=GC_CHUNK, loss_parameters=[scale])
    mean = loss.clone()
    dist.all_reduce(mean)
    grads = [p.grad.clone() for p in list(image.parameters()) + list(text.parameters())]
    return {"loss": float(mean) / WORLD, "grads": grads + [scale.grad.clone()],
            "allreduce_calls": calls["n"], "expected_allreduce_calls": len(towers)}


def _world2_worker(rank, world_size):
    torch.set_num_threads(1)
    modes = ["fallback"] + (["gather", "ring"] if has_fcd() else [])
    out = {"gradcache": _gradcache_case(rank, "fallback"),
           "gradcache_modes": {m: _gradcache_case(rank, m) for m in modes}}
    from . import _train_cases

    out.update(_train_cases.distributed_cases(rank, world_size))
    return out


@functools.lru_cache(maxsize=1)
def _world2_outcome():
    """("ok", results) or ("error", the exception): the spawn runs once per session, also
    when it fails (each test would otherwise wait out the deadline again)."""
    from fastcontrast.methods.launch import spawn

    from . import _train_cases

    try:
        ranks = spawn(_world2_worker, WORLD, timeout=SPAWN_TIMEOUT_S,
                      collective_timeout_s=COLLECTIVE_TIMEOUT_S)
    except Exception as error:  # noqa: BLE001 - re-raised by every test that needs it
        return "error", error
    return "ok", {"ranks": ranks, "gradcache_reference": gradcache_reference(),
                  **_train_cases.references()}


def world2_results():
    status, value = _world2_outcome()
    if status == "error":
        raise RuntimeError("the shared W = 2 spawn failed (once, for all its tests)") from value
    return value
