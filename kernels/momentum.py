"""Multi-tensor momentum (EMA) update in Triton: all (target, online) pairs of a group, ONE launch.

    target <- lerp(target, online, w) = m * target + (1 - m) * online,   w = 1 - m

computed in fp32 (fp64 for fp64 targets) with torch.lerp's two-sided formula, which is exact at
both ends (w = 0 keeps the target, w = 1 gives the online tensor bit for bit):

    w < 0.5:  target + w * (online - target)        else:  online - (online - target) * (1 - w)

Layout (the idea of apex's multi_tensor_apply): the host writes one int64 metadata tensor

    [target addresses (T) | online addresses (T) | numels (T) | first block of each tensor (T) |
     tensor of each block (B)]

and launches one program per BLOCK elements of every tensor; program b reads which tensor it
belongs to, turns that tensor's address into a typed pointer and updates its slice. The metadata
depends only on the tensors' addresses and sizes, so it is built once and cached (a training loop
updates the same parameters every step): a cached call is exactly one kernel launch.

Read top to bottom: the @triton.jit kernel, then the host function ``lerp_multi_tensor_``.
"""
from collections import OrderedDict

import torch
import triton
import triton.language as tl

from ._common import _INTERPRET, _check_device, _device_context, cast_rne

# (target dtype, online dtype) pairs the kernel accepts: the same dtype, or an fp32/fp64 master
# target fed by a lower-precision online network.
SUPPORTED_PAIRS = frozenset(
    [(d, d) for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)]
    + [(torch.float32, torch.float16), (torch.float32, torch.bfloat16),
       (torch.float64, torch.float32), (torch.float64, torch.float16),
       (torch.float64, torch.bfloat16)])

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


@triton.jit
def _lerp_tile(tgt_ptrs, onl_ptrs, mask, w, TGT_DTYPE: tl.constexpr,
               COMPUTE_DTYPE: tl.constexpr, MASKED: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """One tile of target <- lerp(target, online, w). Unmasked tiles compile to 128-bit accesses."""
    if MASKED:
        x = tl.load(tgt_ptrs, mask=mask).to(COMPUTE_DTYPE)
        y = tl.load(onl_ptrs, mask=mask).to(COMPUTE_DTYPE)
    else:
        x = tl.load(tgt_ptrs).to(COMPUTE_DTYPE)
        y = tl.load(onl_ptrs).to(COMPUTE_DTYPE)
    diff = y - x
    if w < 0.5:
        out = x + w * diff
    else:
        out = y - diff * (1.0 - w)
    out = cast_rne(out, TGT_DTYPE, EMULATE_BF16)
    if MASKED:
        tl.store(tgt_ptrs, out, mask=mask)
    else:
        tl.store(tgt_ptrs, out)


@triton.jit
def _lerp_multi_tensor_kernel(
    Meta,                       # int64 metadata, layout in the module docstring
    num_tensors,
    w_hi, w_lo,                 # w = w_hi + w_lo: two fp32 scalars, ~48 bits of w for fp64
    TGT_DTYPE: tl.constexpr, ONL_DTYPE: tl.constexpr, COMPUTE_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr, ALIGNED: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    # int64 offsets: a single parameter can exceed 2^31 elements, and so can block * BLOCK.
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(Meta + 4 * num_tensors + pid)
    tgt = tl.load(Meta + t).to(tl.pointer_type(TGT_DTYPE))
    onl = tl.load(Meta + num_tensors + t).to(tl.pointer_type(ONL_DTYPE))
    numel = tl.load(Meta + 2 * num_tensors + t)
    start = (pid - tl.load(Meta + 3 * num_tensors + t)) * BLOCK
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    tgt_ptrs = tgt + offs
    onl_ptrs = onl + offs
    if ALIGNED:  # every address is a multiple of 16 bytes: lets the compiler use 128-bit accesses
        tgt_ptrs = tl.max_contiguous(tl.multiple_of(tgt_ptrs, 16), BLOCK)
        onl_ptrs = tl.max_contiguous(tl.multiple_of(onl_ptrs, 16), BLOCK)
    w = tl.cast(w_hi, COMPUTE_DTYPE) + tl.cast(w_lo, COMPUTE_DTYPE)
    if start + BLOCK <= numel:  # a full tile: no mask
        _lerp_tile(tgt_ptrs, onl_ptrs, offs < numel, w, TGT_DTYPE, COMPUTE_DTYPE, False,
                   EMULATE_BF16)
    else:  # the last tile of a tensor
        _lerp_tile(tgt_ptrs, onl_ptrs, offs < numel, w, TGT_DTYPE, COMPUTE_DTYPE, True,
                   EMULATE_BF16)


# ---------------------------------------------------------------------------------------------
# Host function
# ---------------------------------------------------------------------------------------------

# Elements per program. GPU: 4096 elements over 4 warps (32 per thread, 128-bit accesses for
# aligned fp32); fp64 targets over 16 warps (8 per thread: 32 fp64 values with their int64
# addresses spill registers on sm_90, tests/kernels/test_triton_compile_updates.py). The
# interpreter runs programs one after another in numpy: fewer, larger blocks.
_BLOCK = 1 << 14 if _INTERPRET else 4096
_NUM_WARPS = {torch.float64: 16}
_CACHE_SIZE = 8
_metadata_cache = OrderedDict()


def _check(targets, onlines):
    if len(targets) != len(onlines):
        raise ValueError(f"targets and onlines must have the same length, got {len(targets)} and "
                         f"{len(onlines)}")
    t0, o0 = targets[0], onlines[0]
    if (t0.dtype, o0.dtype) not in SUPPORTED_PAIRS:
        raise TypeError(f"unsupported (target, online) dtypes ({t0.dtype}, {o0.dtype}); supported: "
                        "equal dtypes, or an fp32/fp64 target with a lower-precision online tensor")
    _check_device("targets", t0.device)
    for i, (t, o) in enumerate(zip(targets, onlines)):
        if t.dtype != t0.dtype or o.dtype != o0.dtype:
            raise TypeError(f"one launch takes one dtype pair: pair {i} has ({t.dtype}, "
                            f"{o.dtype}), "
                            f"pair 0 has ({t0.dtype}, {o0.dtype})")
        if t.device != t0.device or o.device != t0.device:
            raise ValueError(f"pair {i} must be on {t0.device} (the device of targets[0]), got "
                             f"target on {t.device}, online on {o.device}")
        if t.shape != o.shape:
            raise ValueError(f"pair {i}: online must have the target's shape {tuple(t.shape)}, got "
                             f"{tuple(o.shape)}")
        if not t.is_contiguous() or not o.is_contiguous():
            raise ValueError(f"pair {i}: target and online must be contiguous, got strides "
                             f"{t.stride()} and {o.stride()}")


def _metadata(targets, onlines):
    """The int64 metadata tensor on the targets' device (cached by addresses and sizes)."""
    tgt_ptrs = [t.data_ptr() for t in targets]
    onl_ptrs = [o.data_ptr() for o in onlines]
    numels = [t.numel() for t in targets]
    key = (targets[0].device, _BLOCK, tuple(tgt_ptrs), tuple(onl_ptrs), tuple(numels))
    meta = _metadata_cache.get(key)
    if meta is not None:
        _metadata_cache.move_to_end(key)
        return meta
    counts = torch.tensor([triton.cdiv(n, _BLOCK) for n in numels], dtype=torch.int64)
    first_block = torch.cumsum(counts, 0) - counts
    block_tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int64), counts)
    host = torch.cat([torch.tensor(tgt_ptrs + onl_ptrs + numels, dtype=torch.int64), first_block,
                      block_tensor])
    meta = host.to(targets[0].device)
    _metadata_cache[key] = meta
    if len(_metadata_cache) > _CACHE_SIZE:
        _metadata_cache.popitem(last=False)
    return meta


def lerp_multi_tensor_(targets, onlines, weight):
    """targets[i] <- lerp(targets[i], onlines[i], weight) for all i, in one kernel launch.

    targets / onlines: equal-length sequences of contiguous tensors on one CUDA device (CPU under
    TRITON_INTERPRET=1), pairwise equal shapes, one (target, online) dtype pair from
    SUPPORTED_PAIRS. weight: float in [0, 1] (= 1 - momentum). Empty tensors are skipped."""
    targets, onlines = list(targets), list(onlines)
    if not targets and not onlines:
        return
    _check(targets, onlines)
    pairs = [(t, o) for t, o in zip(targets, onlines) if t.numel() > 0]
    if not pairs:
        return
    targets, onlines = [p[0] for p in pairs], [p[1] for p in pairs]
    weight = float(weight)
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    w_hi = float(torch.tensor(weight, dtype=torch.float32))
    w_lo = weight - w_hi
    meta = _metadata(targets, onlines)
    aligned = all(t.data_ptr() % 16 == 0 for t in targets) and all(
        o.data_ptr() % 16 == 0 for o in onlines)
    num_blocks = meta.numel() - 4 * len(targets)
    tgt_dtype, onl_dtype = targets[0].dtype, onlines[0].dtype
    compute = tl.float64 if tgt_dtype == torch.float64 else tl.float32
    with _device_context(targets[0]):
        _lerp_multi_tensor_kernel[(num_blocks,)](
            meta, len(targets), w_hi, w_lo,
            TGT_DTYPE=_TL_DTYPES[tgt_dtype], ONL_DTYPE=_TL_DTYPES[onl_dtype],
            COMPUTE_DTYPE=compute, BLOCK=_BLOCK, ALIGNED=aligned,
            # the interpreter's float32 -> bfloat16 cast truncates: round in integer arithmetic
            EMULATE_BF16=_INTERPRET and tgt_dtype == torch.bfloat16,
            num_warps=_NUM_WARPS.get(tgt_dtype, 4))
