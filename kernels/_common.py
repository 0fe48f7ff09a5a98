"""Pieces shared by the Triton op families of this package (infonce.py, siglip.py, queue.py,
momentum.py; the op files never import each other):

- the interpreter switch and the device rule: ``_INTERPRET``, ``_check_device``,
  ``_device_context``;
- kernel outputs: ``new_output`` (poisoned under FASTCONTRAST_POISON_OUTPUTS=1);
- @triton.jit helpers: ``cast_rne``, ``_load_rows``, ``_dot_rows``, ``_tile_dots``;
- launch choices: ``_input_precision`` (the fp32 matmul precision rule), ``_upcast``,
  ``_block_config``, and the gradient scale ``_grad_scale`` of the backward kernels;
- argument checks: ``_check_matrix``.
"""
import os
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .._config import settings

# Input dtypes of the InfoNCE and SigLIP kernels; outputs and accumulation are float32.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Read once, like @triton.jit does: the kernels of this package run in the interpreter iff set.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_loop_bounds():
    """Let the interpreter use a runtime scalar as a loop bound (`range(0, tl.cdiv(M, BLOCK))`,
    `range(0, D, BLOCK_D)`) with NumPy 2.4 or later.

    The interpreter holds a kernel's scalars as one-element NumPy arrays and turns one into a
    Python int with int(array), which NumPy 2.4 rejects for arrays of ndim > 0 ("only
    0-dimensional arrays can be converted to Python scalars"): every loop with a runtime bound
    fails. Triton fixed this after 3.6 (the GPU image's release) by squeezing the array first;
    this applies the same fix to the interpreters that lack it, by wrapping the function that
    installs tensor.__index__ for each launch (its scope undoes both on exit). Compiled kernels
    are untouched, and the kernels keep their plain `range` loops, which the GPU compiler
    pipelines (num_stages); a while loop or a constexpr bound would change the compiled code."""
    import numpy as np

    try:
        int(np.zeros(1, dtype=np.int32))
        return  # this NumPy still converts one-element arrays: nothing to fix
    except TypeError:
        pass
    from triton.runtime import interpreter

    install = getattr(interpreter, "_patch_lang_tensor", None)
    if install is None or getattr(install, "wraps_index", False):
        return

    def install_with_item_index(tensor, scope):
        install(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    install_with_item_index.wraps_index = True
    interpreter._patch_lang_tensor = install_with_item_index


if _INTERPRET:
    _interpreter_loop_bounds()

# Under the poison_outputs setting (fastcontrast/_config.py) kernel outputs are filled with
# POISON_FLOAT / POISON_INT before the launch, so that an element a kernel fails to write shows
# up in the tests.
POISON_FLOAT = float("nan")
POISON_INT = -7

# ---------------------------------------------------------------------------------------------
# @triton.jit helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x.to(DTYPE), rounding to nearest even. With EMULATE_BF16 (the interpreter, whose float32 ->
    bfloat16 cast truncates) a float32 x is rounded to bfloat16 in integer arithmetic: add half
    an ulp of bfloat16 (plus the tie bit), drop the low 16 bits; NaNs stay quiet NaNs."""
    if EMULATE_BF16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        half = tl.where(x != x, (bits >> 16) | 0x40, rounded).to(tl.uint16)
        return half.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _block_rows(block, BLOCK: tl.constexpr, N):
    """The rows block * BLOCK ... + BLOCK - 1 and their in-range mask. Pass block as int64
    (tl.program_id(0).to(tl.int64)): row * stride passes 2^31 on large inputs."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    return offs, offs < N


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


@triton.jit
def _tile_dots(X, Y, x_tile, offs_x, offs_y, mask_x, mask_y, stride_x, stride_y, D,
               BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
               ONE_D_CHUNK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(<x_i, y_j> as a (BLOCK_X, BLOCK_Y) fp32 tile, y tile): with ONE_D_CHUNK from the resident
    x tile and one y tile (returned for reuse), else chunk by chunk over D (x_tile is then
    unused, and so is the returned tile)."""
    if ONE_D_CHUNK:
        y_tile = _load_rows(Y, offs_y, mask_y, stride_y, 0, D, BLOCK_D, UPCAST)
        dots = tl.dot(x_tile, tl.trans(y_tile), input_precision=INPUT_PRECISION)
    else:
        y_tile = x_tile
        dots = _dot_rows(X, Y, offs_x, offs_y, mask_x, mask_y, stride_x, stride_y, D,
                         BLOCK_X, BLOCK_Y, BLOCK_D, UPCAST, INPUT_PRECISION)
    return dots, y_tile


# ---------------------------------------------------------------------------------------------
# Host helpers
# ---------------------------------------------------------------------------------------------


def _check_device(name, device):
    """Kernels run on CUDA devices, and on the CPU only under the interpreter."""
    if device.type != "cuda" and not (_INTERPRET and device.type == "cpu"):
        raise ValueError(f"{name} must be on a CUDA device (or the CPU with TRITON_INTERPRET=1 set "
                         f"before fastcontrast.kernels is imported), got device {device}")


def _device_context(t):
    """Launch on t's CUDA device (nothing to select for a CPU tensor under the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else nullcontext()


def new_output(shape, dtype, device):
    """torch.empty(shape, dtype, device) for a kernel to write; NaN-filled (integers: -7) when
    FASTCONTRAST_POISON_OUTPUTS=1, so that an element no program writes cannot pass a test."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if settings().poison_outputs:
        out.fill_(POISON_FLOAT if out.is_floating_point() else POISON_INT)
    return out


def _input_precision(dtype):
    """fp32 tiles follow torch's float32 matmul setting (tf32 only when torch would use it)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored by tl.dot for fp16/bf16 tiles


def _upcast(dtype):
    """UPCAST: bf16 tiles are converted to fp32 at load in the interpreter (no bf16 arithmetic)."""
    return _INTERPRET and dtype == torch.bfloat16


def _block_config(D, precision, blocks, *, tensor_core, ieee, interpreter):
    """(block_x, block_y, block_d, one_d_chunk, num_warps, num_stages) of a launch.

    The base config is `interpreter` under TRITON_INTERPRET=1, else `ieee` for full-precision fp32
    (precision 'ieee'), else `tensor_core`: dicts of block_x (outer rows per program), block_y
    (inner rows per tile), max_block_d (the largest D run as one chunk), chunk_d (the chunk size
    for larger D), num_warps and num_stages. One chunk has next_power_of_2(D) >= 16 columns.
    `blocks` = (block_x, block_y, block_d), powers of two >= 16 (the minimum tl.dot tile on GPU),
    overrides the sizes; block_d is then both the largest single chunk and the chunk size."""
    base = interpreter if _INTERPRET else (ieee if precision == "ieee" else tensor_core)
    block_x, block_y = base["block_x"], base["block_y"]
    max_block_d, chunk_d = base["max_block_d"], base["chunk_d"]
    if blocks is not None:
        if (len(blocks) != 3 or any(isinstance(b, bool) or not isinstance(b, int) or b < 16
                                    or b & (b - 1) for b in blocks)):
            raise ValueError(f"blocks must be three powers of two >= 16 (rows, inner rows, D "
                             f"chunk), got {blocks!r}")
        block_x, block_y, max_block_d = blocks
        chunk_d = max_block_d
    if D <= max_block_d:
        block_d, one_chunk = max(16, triton.next_power_of_2(max(D, 1))), True
    else:
        block_d, one_chunk = chunk_d, False
    return block_x, block_y, block_d, one_chunk, base["num_warps"], base["num_stages"]


def _grad_scale(magnitude):
    """G = magnitude (a 0-dim fp32 device tensor, e.g. max|grad| * max|scale|) as a (1,) tensor,
    1 where it is 0 or not finite; no host sync. The backward kernels divide their gradient tile
    by G before casting it to the input dtype and multiply G back in fp32."""
    ok = (magnitude > 0) & torch.isfinite(magnitude)
    return torch.where(ok, magnitude, torch.ones_like(magnitude)).reshape(1)


def _check_matrix(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must have dtype in {SUPPORTED_DTYPES} (float64 is not supported "
                        f"by the Triton kernels: their outputs are float32), got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, D), got shape {tuple(t.shape)}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got "
                         f"strides {t.stride()}")
