"""Pieces shared by the Triton op families of this package (infonce.py, siglip.py): the
interpreter switch, row-tile loads and dot products, the fp32 matmul precision rule, and the
argument checks of the host functions."""
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

# Input dtypes of the kernels; outputs and accumulation are float32.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Read once, like @triton.jit does: kernels defined in this module run in the interpreter iff set.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

@triton.jit
def _load_rows(ptr, offs, mask, stride, d0, D, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Load rows `offs` (masked by `mask`) of a row-major (rows, D) matrix, columns d0..d0+BLOCK_D.

    Out-of-range rows and columns read as 0, so they add nothing to a dot product. With UPCAST the
    tile is converted to fp32 at once (bf16 arithmetic is not supported by the interpreter)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    tile = tl.load(ptr + offs[:, None] * stride + offs_d[None, :],
                   mask=mask[:, None] & (offs_d[None, :] < D), other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _dot_rows(X, Y, offs_x, offs_y, mask_x, mask_y, stride_x, stride_y, D,
              BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(BLOCK_X, BLOCK_Y) fp32 tile of <x_i, y_j>, looping over D in BLOCK_D chunks."""
    acc = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        x = _load_rows(X, offs_x, mask_x, stride_x, d0, D, BLOCK_D, UPCAST)
        y = _load_rows(Y, offs_y, mask_y, stride_y, d0, D, BLOCK_D, UPCAST)
        acc = tl.dot(x, tl.trans(y), acc, input_precision=INPUT_PRECISION)
    return acc


def _input_precision(dtype):
    """fp32 tiles follow torch's float32 matmul setting (tf32 only when torch would use it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 tiles


def _device_context(t):
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def _check_matrix(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype in {SUPPORTED_DTYPES} (float64 is not supported by the "
                        f"Triton kernels: their outputs are float32), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {t.stride()}")
