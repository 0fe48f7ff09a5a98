"""Momentum (EMA) update of a target network, fused: one launch per (device, dtype pair) group.

    target <- m * target + (1 - m) * online          (MoCo / BYOL / DINO key or teacher encoder)

computed as torch.lerp(target, online, 1 - m) (exact for m = 0 and m = 1) in float32, or float64
for float64 targets, whatever the storage dtypes. Integer and bool tensors (BatchNorm's
num_batches_tracked) are copied from the online network.

Backends (``backend=``):
  "torch"   torch._foreach_lerp_ per group (any device; lower-precision online tensors are cast to
            the target dtype first)
  "cpu"     the C++ kernel of csrc/cpu/momentum.cpp: all tensors of the call in one OpenMP region
  "triton"  kernels/momentum.py: one multi-tensor launch per group (CUDA tensors; CPU tensors under
            TRITON_INTERPRET=1)
  "cuda"    csrc/cuda/momentum.cu: the same multi-tensor launch in CUDA C++ (built just in time)
  "auto"    CUDA tensors -> "triton" (else "torch"); CPU tensors -> "cpu" when the C++ extension is
            available (measured faster than torch._foreach_lerp_: benchmarks/momentum_targets.py),
            else "torch".
The fused backends take contiguous pairs; any other pair (channels_last, strided views) goes
through the "torch" path.
"""
import math
import numbers
from collections import defaultdict
from collections.abc import Sequence
from typing import List

import torch
from torch import Tensor, nn

from . import _validation as check
from . import backends

__all__ = ["momentum_update", "available_backends", "BACKENDS", "SUPPORTED_DTYPE_PAIRS"]

BACKENDS = ("auto",) + backends.FAMILIES["momentum"]
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# (target dtype, online dtype): equal dtypes, or a float32 / float64 master copy of a
# lower-precision online network. Anything else raises a TypeError.
SUPPORTED_DTYPE_PAIRS = frozenset(
    [(d, d) for d in _FLOATS]
    + [(torch.float32, torch.float16), (torch.float32, torch.bfloat16)]
    + [(torch.float64, d) for d in (torch.float32, torch.float16, torch.bfloat16)])


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_momentum(m):
    if isinstance(m, torch.Tensor):
        if m.dim() != 0 or not m.is_floating_point():
            raise TypeError(f"m must be a float or a 0-dim floating tensor, got a {m.dtype} tensor "
                            f"of shape {tuple(m.shape)}")
        m = float(m)
    elif not isinstance(m, numbers.Real) or isinstance(m, bool):
        raise TypeError(f"m must be a float in [0, 1], got {type(m).__name__}")
    m = float(m)
    if not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise ValueError(f"m must be in [0, 1], got {m}")
    return m


def _named_tensors(module, include_buffers):
    tensors = dict(module.named_parameters())
    if include_buffers:
        tensors.update(module.named_buffers())
    return tensors


def _list_names(names, limit=5):
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _pairs_of_modules(target, online, include_buffers):
    t_named = _named_tensors(target, include_buffers)
    o_named = _named_tensors(online, include_buffers)
    missing, extra = t_named.keys() - o_named.keys(), o_named.keys() - t_named.keys()
    if missing or extra:
        what = "parameters and buffers" if include_buffers else "parameters"
        raise ValueError(f"target and online must have the same {what} by name; only in target: "
                         f"[{_list_names(missing)}], only in online: [{_list_names(extra)}]")
    return [(name, t_named[name], o_named[name]) for name in t_named]


def _pairs_of_sequences(target, online):
    target, online = list(target), list(online)
    if len(target) != len(online):
        raise ValueError(f"target and online must have the same length, got {len(target)} and "
                         f"{len(online)}")
    for side, seq in (("target", target), ("online", online)):
        for i, t in enumerate(seq):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{side}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return [(f"[{i}]", t, o) for i, (t, o) in enumerate(zip(target, online))]


def _pairs(target, online, include_buffers):
    """[(name, target tensor, online tensor)], checked pairwise (shape, device, dtype)."""
    if isinstance(target, nn.Module) and isinstance(online, nn.Module):
        pairs = _pairs_of_modules(target, online, include_buffers)
    elif (isinstance(target, Sequence) and isinstance(online, Sequence)
          and not isinstance(target, (str, torch.Tensor))
          and not isinstance(online, (str, torch.Tensor))):
        pairs = _pairs_of_sequences(target, online)
    else:
        raise TypeError(f"target and online must both be nn.Modules or both sequences of tensors, "
                        f"got {type(target).__name__} and {type(online).__name__}")
    for name, t, o in pairs:
        if t.shape != o.shape:
            raise ValueError(f"{name}: online must have the target's shape {tuple(t.shape)}, got "
                             f"{tuple(o.shape)}")
        if t.device != o.device:
            raise ValueError(f"{name}: online must be on the target's device ({t.device}), got "
                             f"{o.device}")
        if t.is_floating_point() or o.is_floating_point():
            if (t.dtype, o.dtype) not in SUPPORTED_DTYPE_PAIRS:
                raise TypeError(
                    f"{name}: unsupported (target, online) dtypes ({t.dtype}, {o.dtype}); "
                    "supported: equal floating dtypes, or a float32/float64 target with a "
                    "lower-precision online tensor")
        elif t.dtype.is_complex or o.dtype.is_complex:
            raise TypeError(f"{name}: complex tensors are not supported, got ({t.dtype}, "
                            f"{o.dtype})")
        elif t.dtype != o.dtype:
            raise TypeError(f"{name}: integer/bool tensors are copied and need equal dtypes, got "
                            f"target {t.dtype} and online {o.dtype}")
    return pairs


# ---------------------------------------------------------------------------------------------
# The kernel op: one group (one device, one dtype pair), lerp weight w = 1 - m.


def _lerp_torch(targets, onlines, weight):
    dtype = targets[0].dtype
    onlines = [o if o.dtype == dtype else o.to(dtype) for o in onlines]
    torch._foreach_lerp_(targets, onlines, weight)


@torch.library.custom_op("fastcontrast::momentum_lerp_", mutates_args=("targets",),
                         device_types=("cpu", "cuda"))
def momentum_lerp_(targets: List[Tensor], onlines: List[Tensor], weight: float,
                   backend: str) -> None:
    """targets[i] <- lerp(targets[i], onlines[i], weight) in place, in one launch of backend
    ``backend`` ("torch": torch._foreach_lerp_; "cpu": csrc/cpu/momentum.cpp; "triton":
    kernels/momentum.py; "cuda": csrc/cuda/momentum.cu)."""
    if backend == "torch":
        _lerp_torch(targets, onlines, weight)
    elif backend == "triton":
        backends.kernels("momentum", "triton").lerp_multi_tensor_(targets, onlines, weight)
    else:  # the C++ CPU and CUDA modules have the same entry point
        backends.kernels("momentum", backend).momentum_update_(targets, onlines, weight)


@momentum_lerp_.register_fake
def _momentum_lerp_fake(targets, onlines, weight, backend):
    return None


def available_backends(device="cpu"):
    """The momentum_update backends that can run on ``device`` in this process."""
    return backends.available_backends(device, family="momentum")


def resolve_backend(backend, device):
    """The concrete backend for ``backend`` on ``device``; ValueError where it cannot run."""
    return backends.resolve(backend, device, family="momentum")


# ---------------------------------------------------------------------------------------------
# Public function


def momentum_update(target, online, m, *, include_buffers=False, backend="auto"):
    """In place, without autograd: target <- m * target + (1 - m) * online for every parameter.

    target, online: nn.Modules (parameters matched by name; with ``include_buffers`` floating
    buffers are averaged too and integer buffers, e.g. BatchNorm's num_batches_tracked, copied)
    or equal-length sequences of tensors (pairwise). m: float or 0-dim tensor in [0, 1]
    (m = 1 keeps the target, m = 0 copies the online values exactly). Target dtypes may be wider
    than the online ones (a float32 EMA of a float16/bfloat16 model); see SUPPORTED_DTYPE_PAIRS.
    backend: "auto" | "torch" | "cpu" | "triton" | "cuda" (module docstring). One kernel launch
    per (device, target dtype, online dtype) group."""
    m = _check_momentum(m)
    check.check_flag("include_buffers", include_buffers)
    check.check_choice("backend", backend, BACKENDS)
    pairs = _pairs(target, online, include_buffers)
    weight = 1.0 - m
    # (device, target dtype, online dtype, fused) -> (targets, onlines); fused kernels take
    # contiguous pairs, anything else (channels_last, views with gaps) goes through "torch".
    groups = defaultdict(lambda: ([], []))
    copies = ([], [])
    for _, t, o in pairs:
        if t.is_floating_point():
            fused = t.is_contiguous() and o.is_contiguous()
            bucket = groups[(t.device, t.dtype, o.dtype, fused)]
        else:
            bucket = copies
        bucket[0].append(t)
        bucket[1].append(o)
    with torch.no_grad():
        for (device, _, _, fused), (targets, onlines) in groups.items():
            name = resolve_backend(backend, device) if fused else "torch"
            momentum_lerp_(targets, onlines, weight, name)
        if copies[0]:
            torch._foreach_copy_(copies[0], copies[1])
