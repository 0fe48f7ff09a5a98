"""One worker of test_torchrun_nnodes.py, started by torchrun (one process per "node"): a DDP
step of the distributed clip_loss and nt_xent on this rank's shard of a fixed float64 batch,
the losses and the DDP-averaged gradients saved to OUT/rank<R>.pt.

    python -m torch.distributed.run --nnodes 2 --nproc-per-node 1 ... _torchrun_worker.py OUT

Every collective has a timeout (init_process_group(timeout=...)) and the process group is
destroyed on every exit path."""
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

SIZES = (5, 3)      # rows of ranks 0 and 1: uneven on purpose
D_IN, D_OUT = 7, 4
TIMEOUT_S = 60


class PairEncoder(nn.Module):
    """Two towers and a learnable logit scale, as a CLIP model has."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(D_IN, D_OUT)
        self.text = nn.Linear(D_IN, D_OUT)
        self.log_scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x, y):
        return self.image(x), self.text(y), self.log_scale.exp()


def build(seed=0):
    """The model and the whole batch (x, y), identical in every process."""
    torch.manual_seed(seed)
    model = PairEncoder().double()
    total = sum(SIZES)
    return model, torch.randn(total, D_IN, dtype=torch.float64), torch.randn(
        total, D_IN, dtype=torch.float64)


def losses(model, x, y, clip_fn, nt_xent_fn):
    """{name: (loss, {parameter: grad})} for one step of each loss on (x, y)."""
    out = {}
    for name in ("clip_loss", "nt_xent"):
        model.zero_grad()
        image, text, scale = model(x, y)
        if name == "clip_loss":
            loss = clip_fn(image, text, scale)
        else:
            loss = nt_xent_fn(image, text, temperature=0.3) + 0.0 * scale
        loss.backward()
        module = model.module if hasattr(model, "module") else model
        out[name] = (loss.detach(), {k: p.grad.detach().clone()
                                     for k, p in module.named_parameters()})
    return out


def main(out_dir):
    from fastcontrast import distributed as fcd

    dist.init_process_group("gloo", timeout=timedelta(seconds=TIMEOUT_S))
    try:
        rank = dist.get_rank()
        model, x, y = build()
        start = sum(SIZES[:rank])
        rows = slice(start, start + SIZES[rank])
        ddp = DistributedDataParallel(model)
        result = losses(ddp, x[rows], y[rows], fcd.clip_loss, fcd.nt_xent)
        result["world_size"] = dist.get_world_size()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
