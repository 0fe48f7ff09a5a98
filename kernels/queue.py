"""Ring-buffer enqueue of a negative queue in Triton: keys (cast to the queue dtype), optional
labels and sample indices, and the new pointer and count, all written by ONE launch.

With a queue of ``size`` rows whose write pointer is ``pointer``, enqueuing a batch of B rows is
the same as writing row b to slot (pointer + b) % size for b = 0, 1, ..., B - 1 in order; when
B > size the rows b < B - size would be overwritten within the same batch, so only the last
``rows = min(B, size)`` rows are written (their slots are distinct, hence no write conflicts):

    dst[(pointer + b) % size] = src[b]     for b in [B - rows, B)
    pointer <- (pointer + B) % size,   count <- min(count + B, size)

The host passes the pointer and count as scalars (it keeps a mirror of both, so the launch needs
no device-to-host read) and the kernel's first program stores their new values into the queue's
0-dim buffers. Grid: (row blocks, column blocks); the programs of column block 0 also copy the
labels / indices of their rows.
"""
import torch
import triton
import triton.language as tl

from ._common import _INTERPRET, _check_device, _device_context, cast_rne

# Key dtypes of the queue and of the enqueued batch (any pair: the kernel casts, rounding to
# nearest even).
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _enqueue_kernel(
    Src, Dst,                   # src (B, D) rows of stride stride_src; dst (size, D) contiguous
    SrcLabels, DstLabels,       # HAS_LABELS: (B,) int64 and (size,) int64
    SrcIndices, DstIndices,     # HAS_INDICES: (B,) int64 and (size,) int64
    PointerBuf, CountBuf,       # 0-dim int64 buffers of the queue
    first_row, rows, D, size, pointer, new_pointer, new_count, stride_src,
    HAS_LABELS: tl.constexpr, HAS_INDICES: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    # int64 offsets: slot * D reaches size * D, which can exceed 2^31 for large queues.
    pid_r = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    mask_r = r < rows
    src_row = first_row + r
    slot = (pointer + src_row) % size
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = mask_r[:, None] & (cols[None, :] < D)
    keys = tl.load(Src + src_row[:, None] * stride_src + cols[None, :], mask=mask)
    keys = cast_rne(keys, Dst.dtype.element_ty, EMULATE_BF16)
    tl.store(Dst + slot[:, None] * D + cols[None, :], keys, mask=mask)
    if pid_d == 0:
        if HAS_LABELS:
            tl.store(DstLabels + slot, tl.load(SrcLabels + src_row, mask=mask_r), mask=mask_r)
        if HAS_INDICES:
            tl.store(DstIndices + slot, tl.load(SrcIndices + src_row, mask=mask_r), mask=mask_r)
        if pid_r == 0:
            tl.store(PointerBuf, new_pointer)
            tl.store(CountBuf, new_count)


# ---------------------------------------------------------------------------------------------
# Host function
# ---------------------------------------------------------------------------------------------


def _block_sizes(D):
    """(BLOCK_R, BLOCK_D): about 4096 elements per program on GPU, 65536 in the interpreter."""
    block_d = min(triton.next_power_of_2(D), 256 if not _INTERPRET else 1024)
    per_program = 1 << 16 if _INTERPRET else 4096
    return max(1, per_program // block_d), block_d


def _check(keys, dst, labels, dst_labels, indices, dst_indices, pointer_buf, count_buf):
    if dst.dtype not in SUPPORTED_DTYPES or keys.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"keys and the queue must have dtypes in {SUPPORTED_DTYPES}, got "
                        f"{keys.dtype} and {dst.dtype}")
    if keys.dim() != 2 or dst.dim() != 2 or keys.shape[1] != dst.shape[1]:
        raise ValueError(f"keys must have shape (B, {dst.shape[1]}) for a queue of shape "
                         f"{tuple(dst.shape)}, got {tuple(keys.shape)}")
    if not dst.is_contiguous():
        raise ValueError(f"the queue's keys must be contiguous, got strides {dst.stride()}")
    device = dst.device
    _check_device("the queue", device)
    for name, src, buf in (("labels", labels, dst_labels), ("indices", indices, dst_indices)):
        if (src is None) != (buf is None):
            raise ValueError(f"{name} and the queue's {name} buffer must be given together")
        if src is not None and (src.dtype != torch.int64 or buf.dtype != torch.int64
                                or src.shape != (keys.shape[0],) or src.device != device):
            raise ValueError(f"{name} must be int64 of shape ({keys.shape[0]},) on {device}, got "
                             f"{src.dtype} of shape {tuple(src.shape)} on {src.device}")
    for name, t in (("keys", keys), ("pointer", pointer_buf), ("count", count_buf)):
        if t.device != device:
            raise ValueError(f"{name} must be on {device} (the queue's device), got {t.device}")


def enqueue_(dst, keys, pointer, count, pointer_buf, count_buf, *, dst_labels=None, labels=None,
             dst_indices=None, indices=None):
    """Write the batch ``keys`` (B, D) into the ring buffer ``dst`` (size, D) at ``pointer`` (int),
    with optional int64 labels / indices into their (size,) buffers, and store the new pointer and
    count (count: filled rows before the call, an int) into the 0-dim int64 buffers. One launch.
    Returns (new_pointer, new_count) as ints."""
    _check(keys, dst, labels, dst_labels, indices, dst_indices, pointer_buf, count_buf)
    batch, D = keys.shape
    size = dst.shape[0]
    new_pointer, new_count = (pointer + batch) % size, min(count + batch, size)
    if batch == 0:
        return pointer, count
    if keys.stride(1) != 1:
        keys = keys.contiguous()
    rows = min(batch, size)
    block_r, block_d = _block_sizes(D)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(D, block_d))
    # Unused pointers are never dereferenced (their constexpr flag is off): pass dst.
    with _device_context(dst):
        _enqueue_kernel[grid](
            keys, dst,
            labels if labels is not None else dst, dst_labels if dst_labels is not None else dst,
            indices if indices is not None else dst,
            dst_indices if dst_indices is not None else dst,
            pointer_buf, count_buf,
            batch - rows, rows, D, size, pointer, new_pointer, new_count, keys.stride(0),
            HAS_LABELS=labels is not None, HAS_INDICES=indices is not None,
            BLOCK_R=block_r, BLOCK_D=block_d,
            EMULATE_BF16=_INTERPRET and dst.dtype == torch.bfloat16 and keys.dtype != dst.dtype,
            num_warps=4)
    return new_pointer, new_count
