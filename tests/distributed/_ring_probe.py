"""What ring mode holds and when it communicates, measured inside a worker (see
run_ring_probe, called by _workers for W = 2 and 4):

    memory   the peak bytes of the storages created by the ops of the forward and of the
             backward (a TorchDispatchMode sees every op's outputs; storages that alias an
             input are not new), in units of one key block (M_r x D), and the bytes the
             autograd graph saves beyond the inputs (saved_tensors_hooks)
    overlap  the order of the posted point-to-point batches and the block computes: the
             transfer of the next block must be posted before each block's compute
    passes   how many key-block transfers each direction makes: one ring forward (W - 1 block
             sends) and one ring backward (W - 1 block sends and W accumulator hand-overs)
"""
import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

ROWS, DIM = 8, 256  # per rank; D >> N so that score tiles stay far below a block


class NewStorages(TorchDispatchMode):
    """Peak total bytes of live storages that the ops create while the mode is active."""

    def __init__(self, min_bytes):
        super().__init__()
        self.min_bytes, self.live, self.peak = min_bytes, {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if storage.nbytes() >= self.min_bytes and ptr not in inputs:
                self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


class Events:
    """Wraps ring._post and the block computes of ring.py to log their order."""

    def __init__(self, ring, block_numel):
        self.ring, self.block_numel, self.log = ring, block_numel, []
        self.saved = {name: getattr(ring, name) for name in
                      ("_post", "lse_block_forward", "lse_block_backward")}

    def __enter__(self):
        ring, saved = self.ring, self.saved

        def post(ops):
            blocks = [op for op in ops if op.tensor.numel() == self.block_numel]
            self.log.append(("post", sum(op.op is dist.irecv for op in blocks),
                             sum(op.op is dist.isend for op in blocks)))
            return saved["_post"](ops)

        def wrap(name):
            def compute(*args, **kwargs):
                self.log.append((name, None, None))
                return saved[name](*args, **kwargs)
            return compute

        ring._post = post
        ring.lse_block_forward = wrap("lse_block_forward")
        ring.lse_block_backward = wrap("lse_block_backward")
        return self

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(self.ring, name, fn)


def _overlap_ok(log, compute, world, per_step):
    """Every step but the last computes after a post that receives the next block."""
    steps = [i for i, (kind, _, _) in enumerate(log) if kind == compute][::per_step]
    if len(steps) != world:
        return False
    for step, i in enumerate(steps[:-1]):
        posts = [e for e in log[:i] if e[0] == "post"]
        if not posts or posts[-1][1] < 1:
            return False
    return True


def _sends(log):
    return sum(e[2] for e in log if e[0] == "post")


def run_ring_probe(group, out, tag):
    """out["ring_probe/" + tag + ...]: measurements for the test (see the module docstring)."""
    from fastcontrast import distributed as fcd
    from fastcontrast.distributed import ring

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(11 + rank)
    block_bytes = ROWS * DIM * 8
    for mode in ("ring", "gather"):
        image = torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
        text = torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64, requires_grad=True)
        weight = 1.0 + rank  # rank-dependent upstream weight
        saved = []
        inputs = {image.untyped_storage().data_ptr(), text.untyped_storage().data_ptr()}

        def pack(t):
            if t.untyped_storage().data_ptr() not in inputs:
                saved.append(t.untyped_storage().nbytes())
            return t

        with Events(ring, ROWS * DIM) as events:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with NewStorages(block_bytes // 8) as fwd:
                    loss = fcd.clip_loss(image, text, 2.0, backend="torch", mode=mode,
                                         group=group) * weight
            forward_log = list(events.log)
            with NewStorages(block_bytes // 8) as bwd:
                loss.backward()
            backward_log = events.log[len(forward_log):]
        key = f"ring_probe/{tag}{mode}"  # outside "w{W}/", whose values are relative errors
        out[f"{key}/forward_blocks"] = fwd.peak / block_bytes
        out[f"{key}/backward_blocks"] = bwd.peak / block_bytes
        out[f"{key}/saved_blocks"] = sum(saved) / block_bytes
        if mode == "ring":
            per_step = len(ring.key_chunks(ROWS))
            out[f"{key}/forward_overlap"] = _overlap_ok(forward_log, "lse_block_forward",
                                                        world, 1)
            out[f"{key}/backward_overlap"] = _overlap_ok(backward_log, "lse_block_backward",
                                                         world, per_step)
            out[f"{key}/forward_block_sends"] = _sends(forward_log)
            out[f"{key}/backward_block_sends"] = _sends(backward_log)
