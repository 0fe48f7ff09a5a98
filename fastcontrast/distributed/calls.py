"""What every public distributed call does around its loss: the mode and backend checks
(``start_call``), the refusal that keeps the ranks in step when a local check fails (``refusal``),
the metadata exchange that checks the ranks agree (``exchange``, with ``mode_code``,
``float_code`` and ``prefix_code`` for the options it carries), the inputs' preparation
(``prepare``, ``compute_dtype``) and the group's reduction convention (``group_reduce``; the
convention is stated in fastcontrast.distributed.api).
"""
import struct
import zlib
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import _validation as check
from ..backends import PROPERTIES, resolve
from .collectives import Comm

MODES = ("gather", "ring")
_EPS = 1e-12  # as torch.nn.functional.normalize and the single-process losses


def start_call(name, mode, group, backend, device, dtype):
    """(Comm, resolved backend) after the local checks that need no communication."""
    check.check_choice("mode", mode, MODES)
    comm = Comm(group, caller=f"fastcontrast.distributed.{name}")
    if backend == "reference":
        raise ValueError(f"fastcontrast.distributed.{name} runs the fused kernels: backend must "
                         "be 'auto', 'torch', 'cpu' or 'triton', got 'reference'")
    return comm, resolve(backend, device, dtype=dtype)


@contextmanager
def refusal(group, name, tensor):
    """Local argument checks of fastcontrast.distributed.``name``: when one raises a TypeError
    or ValueError while a process group is initialised, this rank first joins the call's
    metadata exchange with a failure status (Comm.exchange), so the other ranks raise too
    instead of waiting in it; then the error propagates."""
    try:
        yield
    except (TypeError, ValueError):
        if dist.is_available() and dist.is_initialized():
            comm = Comm(group, caller=f"fastcontrast.distributed.{name}")
            comm.exchange([], _exchange_device(comm, tensor), failed=True)
        raise


def _exchange_device(comm, tensor):
    if isinstance(tensor, torch.Tensor) and (comm.backend != "nccl" or tensor.is_cuda):
        return tensor.device
    return torch.device("cuda", torch.cuda.current_device()) if comm.backend == "nccl" \
        else torch.device("cpu")


def exchange(comm, device, rows):
    """Every rank's metadata (``rows``: (what, value) pairs, values ints); checks that every
    entry whose ``what`` is not None agrees across ranks (a clear ValueError naming it and the
    ranks' values, on every rank at once: no rank is left waiting). Returns the W x k table."""
    table = comm.exchange([int(v) for _, v in rows], device)
    for column, (what, _) in enumerate(rows):
        if what is None:
            continue
        if what.startswith("dtype of "):
            comm.check_dtype(table, column, what[len("dtype of "):])
        else:
            comm.check_same(table, column, what)
    return table


def mode_code(mode):
    return MODES.index(mode)


def prepare(t, dtype, normalize):
    t = t.to(dtype)
    return (F.normalize(t, dim=-1, eps=_EPS) if normalize else t).contiguous()


def group_reduce(comm, loss, reduction, total):
    """The group convention (fastcontrast.distributed.api's docstring): this rank's share of the
    loss, ``total`` the count of all ranks that the mean divides by."""
    if reduction == "none":
        return loss
    scaled = loss.sum() * comm.world
    return scaled / max(total, 1) if reduction == "mean" else scaled


def compute_dtype(backend, dtype):
    return PROPERTIES[backend].compute_dtype(dtype)


def float_code(value):
    """A float option as the int64 of its bits (the metadata exchange carries ints)."""
    return 0 if value is None else struct.unpack("<q", struct.pack("<d", float(value)))[0]


def prefix_code(options):
    """One int that differs when the ranks' Matryoshka prefixes or weights differ (0 without
    them), for the first exchange of every call: a rank that leaves them out, or passes other
    ones, is refused on every rank at once (ring mode makes one call per prefix)."""
    if not options.matryoshka_dims:
        return 0
    return zlib.crc32(repr((options.matryoshka_dims, options.matryoshka_weights)).encode())

