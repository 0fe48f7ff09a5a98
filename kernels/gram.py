"""Masked log-sum-exp of a set against itself (a symmetric Gram matrix) and its gradient, Triton.

    s_ij = alpha_i * beta_j * <z_i, z_j>     (alpha = c beta, so s = s^T; usually alpha = 1/tau,
                                              beta = 1 on L2-normalised z)
    entry (i, j) masked iff exclude_diag and i == j, or row_ids_i == col_ids_j >= 0 (a symmetric
    relation, guaranteed by the caller)
    gram_lse_forward  -> row_lse_i = logsumexp_j s_ij
    gram_lse_backward -> dz_i = alpha_i sum_j (dS_ij + dS_ji) beta_j z_j,
                         dS_ij = g_i exp(s_ij - row_lse_i), 0 where masked

Kernels (square tiles of B rows, N rows in all, D features, T = ceil(N / B)):
  - ``_gram_fwd_kernel``: program I loops over the tiles J >= I only; tile (I, J) updates the
    online (max, sum) of rows I and, for J > I, the (max, sum) of rows J (the tile reduced over its
    rows), merged into global fp32 buffers under a per-block spin lock. The host combines both:
    row_lse = logaddexp(own part, merged part). Work: T (T + 1) / 2 tiles, about N^2 D
    multiply-adds instead of the 2 N^2 D of the full product. Traffic: each program reads its
    B x D block once (one D chunk) and every later block once: about (N^2 / 2B) D input elements
    read, plus 2 N fp32 of merged statistics per tile column (read and written under the lock).
  - the backward is kernels/_masked_lse_kernels.py's ``_masked_lse_bwd_kernel``, launched by
    kernels/infonce.py with X = Y = z and both lse terms from the same row statistics:
    dz_i = alpha_i sum_j (dS_ij + dS_ji) beta_j z_j with
    dS_ij + dS_ji = g_i exp(s_ij - lse_i) + g_j exp(s_ij - lse_j) (s symmetric) is exactly its dX
    with lse_x = lse_y = row_lse and grad_x = grad_y = row_grad. One launch gives dz (no dkeys
    launch), with its grid (row blocks, D splits), fp32 dz accumulator in registers (no
    read-modify-write of dz per tile for D above one chunk), autotuning switch and traffic /
    FLOP model (see that kernel's docstring, NX = NY = N): 4 N^2 D FLOPs at one split, without
    the triangle saving of the forward.
The candidate mask, the online row update and the locked merge of the rows J are
kernels/_lse_tiles.py's, shared with the full-product forward.
Numerics as kernels/infonce.py: log2 units, fp32 accumulation, fp16/bf16 tile products, the
gradient tile divided by G = max|g| max|beta| before its cast; non-finite scores as torch.logsumexp.
"""
import math

import torch
import triton
import triton.language as tl

from .._validation import check_ids
from . import infonce
from ._common import (_block_config, _check_device, _check_matrix, _device_context,
                      _input_precision, _load_rows, _tile_dots, _upcast, new_output)
from ._lse_tiles import (LN2, LOG2E, load_ids, merge_column_stats, online_row_lse,
                         scaled_masked_scores)


@triton.jit
def _gram_fwd_kernel(
    Z, Alpha, Beta, RowIds, ColIds,   # z (N, D); alpha, beta (N,) fp32; ids (N,) int64 (HAS_IDS)
    OwnLse,                           # out (N,) fp32: lse of row i over the tiles J >= block(i)
    ColMax, ColSum, Lock,             # (N,) fp32 (log2 units, init -inf / 0), (T,) int32 locks
    N, D, stride_z,
    BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, EXCLUDE_DIAG: tl.constexpr,
    HAS_IDS: tl.constexpr, ONE_D_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 at large N * D
    offs_r = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask_r = offs_r < N
    a2 = tl.load(Alpha + offs_r, mask=mask_r, other=0.0) * LOG2E
    ids_r = load_ids(RowIds, offs_r, mask_r, HAS_IDS)
    z_tile = _load_rows(Z, offs_r, mask_r, stride_z, 0, D, BLOCK_D, UPCAST)
    m_i = tl.full((BLOCK,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK,), dtype=tl.float32)
    n_b = tl.cdiv(N, BLOCK)
    for cb in range(pid, n_b):
        offs_c = cb * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask_c = offs_c < N
        b = tl.load(Beta + offs_c, mask=mask_c, other=0.0)
        dots, _ = _tile_dots(Z, Z, z_tile, offs_r, offs_c, mask_r, mask_c, stride_z, stride_z, D,
                             BLOCK, BLOCK, BLOCK_D, ONE_D_CHUNK, UPCAST, INPUT_PRECISION)
        s = scaled_masked_scores(dots, a2, b, offs_r, offs_c, mask_r, mask_c, 0, ids_r,
                                 load_ids(ColIds, offs_c, mask_c, HAS_IDS), EXCLUDE_DIAG, HAS_IDS)
        m_i, l_i = online_row_lse(m_i, l_i, s)
        if cb > pid:  # the same scores are entries of rows offs_c (s symmetric)
            merge_column_stats(s, ColMax, ColSum, Lock, cb, offs_c, mask_c)
    tl.store(OwnLse + offs_r, (m_i + tl.log2(l_i)) * LN2, mask=mask_r)


# Square tiles (one block size for rows and columns). GPU values compile for sm_90 without
# spills (tests/kernels/test_triton_gram_compile.py); not tuned on a GPU.
_GPU_TENSOR_CORE = {
    "fwd": dict(block_x=64, block_y=64, max_block_d=128, chunk_d=64, num_warps=4, num_stages=3),
}
# fp32 'ieee' (FMA units, operands in registers). num_stages 1: with 2, Triton 3.6's ptxas spills
# 4 bytes with the diagonal mask and D in chunks; 1 spills nowhere on 3.6 or 3.9 (not timed).
_GPU_IEEE = {
    "fwd": dict(block_x=64, block_y=64, max_block_d=32, chunk_d=32, num_warps=8, num_stages=1),
}
_INTERPRETER = dict(block_x=64, block_y=64, max_block_d=128, chunk_d=128, num_warps=4,
                    num_stages=1)


def _forced_blocks(precision, block_rows):
    """(block_x, block_y, max_block_d) of square tiles of block_rows (a power of two >= 16) that
    tests force, or None (the configs above)."""
    if not block_rows:
        return None
    base = _INTERPRETER if precision != "ieee" else _GPU_IEEE["fwd"]
    return (block_rows, block_rows, base["max_block_d"])


def _config(D, precision, block_rows):
    """(block, block_d, one_d_chunk, num_warps, num_stages) of the forward."""
    bx, _, bd, one, warps, stages = _block_config(
        D, precision, _forced_blocks(precision, block_rows), tensor_core=_GPU_TENSOR_CORE["fwd"],
        ieee=_GPU_IEEE["fwd"], interpreter=_INTERPRETER)
    return bx, bd, one, warps, stages


def _check(z, alpha, beta, row_ids, col_ids, *vectors):
    """Validate the operands; return (N, D, has_ids)."""
    _check_matrix("z", z)
    _check_device("z", z.device)
    n, d = z.shape
    for name, t in (("alpha", alpha), ("beta", beta)) + vectors:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.shape != (n,) or \
                t.device != z.device or (n > 1 and t.stride(0) != 1):
            raise ValueError(f"{name} must be a contiguous float32 ({n},) tensor on {z.device}, "
                             f"got {t.dtype if isinstance(t, torch.Tensor) else type(t).__name__} "
                             f"{tuple(getattr(t, 'shape', ()))}")
    if (row_ids is None) != (col_ids is None):
        raise ValueError("row_ids and col_ids must be given together (both or neither)")
    if row_ids is not None:
        check_ids("row_ids", row_ids, n, z.device)
        check_ids("col_ids", col_ids, n, z.device)
    return n, d, row_ids is not None


def gram_lse_forward(z, alpha, beta, *, exclude_diag=False, row_ids=None, col_ids=None,
                     block_rows=0):
    """row_lse (N,) float32 of the symmetric s_ij = alpha_i beta_j <z_i, z_j> (module docstring);
    -inf for a row without candidates. The merged half is summed in scheduling order: its last
    bits may vary from run to run on GPU."""
    n, d, has_ids = _check(z, alpha, beta, row_ids, col_ids)
    dev = z.device
    if n == 0:
        return torch.full((0,), float("-inf"), dtype=torch.float32, device=dev)
    precision = _input_precision(z.dtype)
    block, block_d, one, warps, stages = _config(d, precision, block_rows)
    own = new_output(n, torch.float32, dev)
    col_max = torch.full((n,), float("-inf"), dtype=torch.float32, device=dev)
    col_sum = torch.zeros(n, dtype=torch.float32, device=dev)
    lock = torch.zeros(triton.cdiv(n, block), dtype=torch.int32, device=dev)
    ids = (row_ids, col_ids) if has_ids else (alpha, beta)
    with _device_context(z):
        _gram_fwd_kernel[(triton.cdiv(n, block),)](
            z, alpha, beta, *ids, own, col_max, col_sum, lock, n, d, z.stride(0),
            BLOCK=block, BLOCK_D=block_d, EXCLUDE_DIAG=bool(exclude_diag), HAS_IDS=has_ids,
            ONE_D_CHUNK=one, UPCAST=_upcast(z.dtype), INPUT_PRECISION=precision,
            num_warps=warps, num_stages=stages)
    merged = col_sum.log2_().add_(col_max).mul_(math.log(2.0))
    return torch.logaddexp(own, merged)


def gram_lse_backward(z, alpha, beta, row_lse, row_grad, *, exclude_diag=False, row_ids=None,
                      col_ids=None, block_rows=0):
    """dz (N, D) float32 = alpha_i sum_j (dS_ij + dS_ji) beta_j z_j (module docstring): the dX of
    kernels/infonce.py's backward with z as both operands and row_lse / row_grad as both the row
    and the column terms; one launch, deterministic."""
    n, d, has_ids = _check(z, alpha, beta, row_ids, col_ids, ("row_lse", row_lse),
                           ("row_grad", row_grad))
    dz, _ = infonce.masked_lse_backward(
        z, z, alpha, beta, row_lse, row_grad, row_lse, row_grad, exclude_diag=exclude_diag,
        row_ids=row_ids, col_ids=col_ids, need_dkeys=False,
        blocks=_forced_blocks(_input_precision(z.dtype), block_rows))
    return dz
