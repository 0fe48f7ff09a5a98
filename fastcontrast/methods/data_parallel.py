"""Data-parallel training of a reference method (``trainer.fit`` with torch.distributed
initialised): the method wrapped in DistributedDataParallel with its losses set distributed, and
the per-step reduction of the logged values."""
import inspect

import torch

from .base import MethodCall


def rank_and_world(group=None):
    """(rank, world size) in ``group``, (0, 1) without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class LossModule(MethodCall):
    """``method.loss`` as a forward, so DistributedDataParallel can wrap the method."""

    call = "loss"


def wrap_data_parallel(method, mode, group, device):
    """The method in DDP (gradients averaged over ``group``), its losses set distributed.
    On a GPU, DDP gets ``device_ids=[device.index]`` (this rank's GPU: one device per process).
    Buffers (queues, BatchNorm running statistics) are not broadcast: each method keeps its
    replicated state consistent itself (MoCo enqueues every rank's keys on every rank)."""
    from torch.nn.parallel import DistributedDataParallel

    method.distributed_mode, method.group = mode, group
    # no buffer broadcast before each forward (newer torch spells it forward_sync_buffers)
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel).parameters else
               {"broadcast_buffers": False})
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(LossModule(method), process_group=group,
                                   device_ids=device_ids, **no_sync)


def reduce_step(values, over, group, world, device):
    """Means over the ranks of the step's logged values, and whether any rank said stop (one
    all_reduce on ``device``: NCCL reduces CUDA tensors only)."""
    import torch.distributed as dist

    keys = sorted(values)
    flat = torch.tensor([values[k] for k in keys] + [float(over)], dtype=torch.float64,
                        device=device)
    dist.all_reduce(flat, group=group)
    means = {k: float(v) / world for k, v in zip(keys, flat[:-1].tolist())}
    return means, bool(flat[-1] > 0)
