"""Masked log-sum-exp over similarity tiles, and its gradient: the Triton core of InfoNCE losses.

Every fused loss of fastcontrast (info_nce, clip_loss, nt_xent, supcon, moco_loss) reduces to scores

    s_ij = alpha_i * beta_j * <q_i, keys_j>          (alpha = 1/temperature, beta = 1 usually)

over candidate pairs, of which it needs only the per-row (and, when symmetric, per-column)
log-sum-exp in the forward pass and the tile gradient dS in the backward pass. The (N, M) score
matrix is never stored: the forward pass streams key tiles past a block of rows with an online
max/sum, and the backward pass recomputes each tile (FlashAttention-2 style).

Read top to bottom:
  1. @triton.jit helpers and kernels
     - ``_masked_lse_fwd_kernel``: grid over row blocks; each program loops over all key blocks and
       keeps a running (max, sum) per row. With HAS_COL it also reduces every tile over its rows and
       merges the per-column (max, sum) into global fp32 buffers under a per-key-block spin lock,
       so the symmetric (CLIP) loss gets both directions from one pass over the tiles.
     - ``_masked_lse_bwd_kernel``: gradient with respect to one operand ("outer", X), looping over
       the other ("inner", Y). Launched twice: X = q (dq, grid over row blocks) and X = keys
       (dkeys, grid over key blocks, the tile seen transposed). Each program owns a block of its
       output (rows x a split of the D columns) and accumulates it on chip, so no atomics, no
       read-modify-write of dX in global memory, and the result is deterministic.
     Each kernel's docstring gives its FLOP and memory-traffic model.
  2. host functions ``masked_lse_forward`` / ``masked_lse_backward`` (validation, block choice,
     launch).

Launch configurations: one per case by default (and always in the interpreter). On a GPU,
FASTCONTRAST_TRITON_AUTOTUNE=1 (read at each call) makes the backward with D above the one-chunk
limit (128 on tensor cores, 32 for fp32 'ieee') autotune over the small set _SPLIT_TENSOR_CORE
(triton.autotune, keyed on N, M, D, dtype and the mask flags; the first call per key then times
every config), and FASTCONTRAST_TRITON_CONFIG=i pins config i of that set (for benchmarking).
The tile loads and dot products, the block-config rule, the device check and the output
allocation are shared with the SigLIP kernels (kernels/_common.py).

Numerics: scores are kept in log2 units (log2(e) folded into the row scale) so the kernels use
exp2/log2; all accumulation is fp32 whatever the input dtype; tile products run on input-dtype
tiles (fp16/bf16 tensor cores on GPU; fp32 inputs follow torch's float32 matmul precision setting).
A row or column without any candidate gets an lse of -inf and contributes nothing (never NaN).
Non-finite scores give what torch.logsumexp gives: NaN with a NaN candidate, +inf with a +inf one
(the exp shift is 0 where the running max is infinite); a masked entry's gradient is 0 whatever
the lse (NaN) and the upstream gradients.
"""
import math

import torch
import triton
import triton.language as tl

from .._validation import check_ids
from .._config import settings
from ._common import SUPPORTED_DTYPES  # noqa: F401 (the dtypes these kernels take)
from ._common import (_INTERPRET, _block_config, _check_device, _check_matrix, _device_context,
                      _grad_scale, _input_precision, _load_rows, _tile_dots, _upcast, new_output)

# The host passes L2-normalised q/keys with alpha = 1/temperature and beta = 1 where it can: tile
# values are then O(1) and fp16/bf16 tiles lose nothing. General alpha/beta are honoured.

# Global constexprs, usable inside the kernels.
_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(s) = exp2(s * log2(e))
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2): natural log from log2 units

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _unmasked(offs_r, offs_c, mask_r, mask_c, diag_offset, ids_r, ids_c,
              EXCLUDE_DIAG: tl.constexpr, HAS_IDS: tl.constexpr):
    """The entries of the tile that are candidates: inside the matrix, with EXCLUDE_DIAG not
    where column c == row r + diag_offset, with HAS_IDS not where ids_r[r] == ids_c[c] >= 0."""
    valid = mask_r[:, None] & mask_c[None, :]
    if EXCLUDE_DIAG:
        valid = valid & (offs_c[None, :] != offs_r[:, None] + diag_offset)
    if HAS_IDS:
        valid = valid & ((ids_r[:, None] != ids_c[None, :]) | (ids_r[:, None] < 0))
    return valid


@triton.jit
def _scaled_masked_scores(dots, row_scale, col_scale, offs_r, offs_c, mask_r, mask_c, diag_offset,
                          ids_r, ids_c, EXCLUDE_DIAG: tl.constexpr, HAS_IDS: tl.constexpr):
    """s_ij = dots_ij * row_scale_i * col_scale_j, -inf where not _unmasked (after the scales: a
    NaN or zero scale never turns a masked entry into NaN)."""
    s = dots * row_scale[:, None] * col_scale[None, :]
    valid = _unmasked(offs_r, offs_c, mask_r, mask_c, diag_offset, ids_r, ids_c, EXCLUDE_DIAG,
                      HAS_IDS)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _finite_or_zero(m):
    """An exp shift from a running max: 0 where it is -inf (nothing unmasked yet: -inf - (-inf)
    never appears, exp2(-inf - 0) = 0 keeps the sum at exactly 0) or +inf (an infinite score:
    exp2(inf - 0) = inf makes the sum, and so the lse, +inf, or NaN with a NaN score, as
    torch.logsumexp; a shift of +inf would give exp2(inf - inf) = NaN)."""
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _load_ids(Ids, offs, mask, HAS_IDS: tl.constexpr):
    """The int64 ids of rows offs (-1, matching nothing, outside the matrix or without ids)."""
    if HAS_IDS:
        return tl.load(Ids + offs, mask=mask, other=-1)
    return offs * 0 - 1


@triton.jit
def _masked_lse_fwd_kernel(
    Q, K, Alpha, Beta,          # q (N, D), keys (M, D) row-major; alpha (N,), beta (M,) fp32
    RowIds, ColIds,             # HAS_IDS only: (N,), (M,) int64; (i, j) masked iff equal and >= 0
    RowLse,                     # out: (N,) fp32, natural log
    ColMax, ColSum, Lock,       # HAS_COL only: (M,) fp32 running max (log2 units, init -inf),
                                # (M,) fp32 running sum (init 0),
                                # (cdiv(M, BLOCK_M),) int32 locks (init 0)
    N, M, D, stride_q, stride_k, diag_offset,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, HAS_IDS: tl.constexpr, HAS_COL: tl.constexpr,
    ONE_D_CHUNK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """Row lse (and with HAS_COL the column (max, sum)) of the masked scores; grid
    (cdiv(N, BLOCK_N),), each program one row block against all key blocks.

    Model, e = input bytes per element, P = cdiv(N, BLOCK_N) programs:
      FLOPs = 2 N M D (one score tile per (row block, key block)) + N M exp2 (2 N M with HAS_COL)
      bytes = ONE_D_CHUNK:  e N D (q once, resident) + e M D P (keys, once per program)
              else:         e N M D (1 / BLOCK_M + 1 / BLOCK_N) (q and key chunks streamed)
              + 4 N (row lse) + 8 M (alpha, beta) (+ 8 (N + M) with ids)
              + HAS_COL: 16 M P (each tile's column max and sum read and written under its lock).
    The M D P and N M D terms are re-reads that mostly hit L2 (concurrent programs sweep the same
    key blocks); the HBM floor is e (N + M) D."""
    # int64 program offsets: row * stride reaches N * D, which exceeds 2^31 at the sizes we target
    # (e.g. 4M rows x 1024 dims); int32 arithmetic would wrap silently.
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    # Row scale in log2 units: every score below is s_ij * log2(e).
    a2 = tl.load(Alpha + offs_n, mask=mask_n, other=0.0) * _LOG2E
    ids_n = _load_ids(RowIds, offs_n, mask_n, HAS_IDS)
    # With ONE_D_CHUNK the row block is one chunk: loaded once, kept for all key blocks (else
    # unused: the compiler drops the load).
    q_tile = _load_rows(Q, offs_n, mask_n, stride_q, 0, D, BLOCK_D, UPCAST)

    m_i = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running row max (log2 units)
    l_i = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of exp2(s - m_i)

    n_kb = tl.cdiv(M, BLOCK_M)
    if HAS_COL:
        # Start at a different key block per program so that concurrent programs take different
        # column locks (round robin) instead of all queueing on block 0.
        first_kb = pid % n_kb
    else:
        first_kb = pid * 0
    arange_m = tl.arange(0, BLOCK_M).to(tl.int64)  # int64 for the same reason as offs_n
    for it in range(0, n_kb):
        kb = (first_kb + it) % n_kb
        offs_m = kb * BLOCK_M + arange_m
        mask_m = offs_m < M
        b = tl.load(Beta + offs_m, mask=mask_m, other=0.0)
        dots, _ = _tile_dots(Q, K, q_tile, offs_n, offs_m, mask_n, mask_m, stride_q, stride_k, D,
                             BLOCK_N, BLOCK_M, BLOCK_D, ONE_D_CHUNK, UPCAST, INPUT_PRECISION)
        s = _scaled_masked_scores(dots, a2, b, offs_n, offs_m, mask_n, mask_m, diag_offset, ids_n,
                                  _load_ids(ColIds, offs_m, mask_m, HAS_IDS), EXCLUDE_DIAG, HAS_IDS)

        # Online row log-sum-exp; the shift is finite (_finite_or_zero). A NaN score makes the
        # sum NaN whether or not the max propagates it, and the sum stays NaN.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = _finite_or_zero(m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new

        if HAS_COL:
            # This tile's column (max, sum), from the same scores. It costs a second exp2 per score:
            # one shared tile max would underflow whole rows or columns when scores span > ~100.
            c_max = tl.max(s, axis=0)
            c_safe = _finite_or_zero(c_max)
            c_sum = tl.sum(tl.exp2(s - c_safe[None, :]), axis=0)
            # Merge into the global per-column state under this key block's lock (the pattern of
            # Triton's layer-norm backward). Barriers: all threads of the program must see the lock
            # taken before reading, and must have issued their stores before it is released.
            lock = Lock + kb
            while tl.atomic_cas(lock, 0, 1) == 1:
                pass
            tl.debug_barrier()
            # .cg: read through L2, never a stale L1 line written by a program on another SM.
            g_max = tl.load(ColMax + offs_m, mask=mask_m, other=float("-inf"), cache_modifier=".cg")
            g_sum = tl.load(ColSum + offs_m, mask=mask_m, other=0.0, cache_modifier=".cg")
            n_max = tl.maximum(g_max, c_max)
            n_safe = _finite_or_zero(n_max)
            n_sum = g_sum * tl.exp2(g_max - n_safe) + c_sum * tl.exp2(c_max - n_safe)
            tl.store(ColMax + offs_m, n_max, mask=mask_m)
            tl.store(ColSum + offs_m, n_sum, mask=mask_m)
            tl.debug_barrier()
            tl.atomic_xchg(lock, 0)

    # lse = ln(2) * (m + log2(l)); no candidate: m = -inf and l = 0 give -inf.
    row_lse = (m_i + tl.log2(l_i)) * _LN2
    tl.store(RowLse + offs_n, row_lse, mask=mask_n)


@triton.jit
def _masked_lse_bwd_kernel(
    X, Y, DX,                   # outer operand (NX, D), inner operand (NY, D); out: dX (NX, D) fp32
    ScaleX, ScaleY,             # (NX,), (NY,) fp32: s_ij = scale_x_i * scale_y_j * <x_i, y_j>
    IdsX, IdsY,                 # HAS_IDS only: (NX,), (NY,) int64; (i, j) masked iff equal and >= 0
    LseX, GradX,                # HAS_LSE_X: (NX,) fp32 lse and upstream grad of the outer side
    LseY, GradY,                # HAS_LSE_Y: (NY,) fp32 lse and upstream grad of the inner side
    GradScale,                  # (1,) fp32 G > 0: dS * scale_y is divided by G before the cast
    NX, NY, D, stride_x, stride_y, stride_dx, diag_offset,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, HAS_IDS: tl.constexpr, HAS_LSE_X: tl.constexpr,
    HAS_LSE_Y: tl.constexpr, ONE_D_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """dX_i = scale_x_i * sum_j dS_ij * scale_y_j * y_j, with
    dS_ij = gx_i exp(s_ij - lse_x_i) + gy_j exp(s_ij - lse_y_j) over unmasked (i, j), 0 elsewhere.

    dq: X = q, Y = keys (lse_x = row lse, lse_y = column lse). dkeys: X = keys, Y = q, roles of the
    row/column terms swapped and the diagonal offset negated (key j masked for row i iff
    j == i + offset, i.e. i == j - offset).

    Grid (cdiv(NX, BLOCK_X), cdiv(D, SPLIT_D)): program (p, c) owns the block dX[rows p, columns
    c*SPLIT_D ...] and keeps it in an fp32 register accumulator over all inner blocks, stored once
    at the end: no atomics, no read-modify-write of dX, deterministic. Per inner block it forms
    the full-D scores (ONE_D_CHUNK: from its resident x tile and one y tile of BLOCK_D = D
    columns, reused for the product; else over D in BLOCK_D chunks, x and y streamed), dS, and
    acc += dS @ y[:, split] (ONE_D_CHUNK: the single split is the y tile already on chip).

    Model, S = cdiv(D, SPLIT_D) splits (S = 1 with ONE_D_CHUNK), e = input bytes per element:
      FLOPs = 2 NX NY D * S (scores, recomputed per split) + 2 NX NY D (dX)  (+ O(NX NY) exp2)
      bytes = ONE_D_CHUNK:  e NX D + e NX NY D / BLOCK_X                     (x once, y per program)
              else:         e NX NY D * (S * (1/BLOCK_X + 1/BLOCK_Y) + 1/BLOCK_X)
              + 4 NX D (dX written once) + 12 (NX + NY) (scales, lse, grads; ids 8 more each).
    The NX NY-proportional terms are re-reads that mostly hit L2 (concurrent programs sweep the
    same inner blocks); the HBM floor is the first and last terms. The alternative layout (one D
    chunk accumulated in place per inner block) moves an extra 8 NX NY D / BLOCK_Y bytes of dX."""
    # int64 program offsets: row * stride reaches NX * D, which exceeds 2^31 at the sizes we target.
    pid = tl.program_id(0).to(tl.int64)
    d_lo = tl.program_id(1) * SPLIT_D
    offs_x = pid * BLOCK_X + tl.arange(0, BLOCK_X)
    mask_x = offs_x < NX
    offs_d = d_lo + tl.arange(0, SPLIT_D)
    sx = tl.load(ScaleX + offs_x, mask=mask_x, other=0.0)
    sx2 = sx * _LOG2E  # scores in log2 units
    ids_x = _load_ids(IdsX, offs_x, mask_x, HAS_IDS)
    g = tl.load(GradScale)
    inv_g = 1.0 / g
    if HAS_LSE_X:
        # An lse of -inf (no candidate) becomes +inf: exp2(s - inf) = 0, never -inf - (-inf).
        lse_x = tl.load(LseX + offs_x, mask=mask_x, other=float("inf")) * _LOG2E
        lse_x = tl.where(lse_x == float("-inf"), float("inf"), lse_x)
        gx = tl.load(GradX + offs_x, mask=mask_x, other=0.0)
    # With ONE_D_CHUNK (D fits one chunk) the x tile stays on chip (else it is unused: the
    # compiler drops the load).
    x_tile = _load_rows(X, offs_x, mask_x, stride_x, 0, D, BLOCK_D, UPCAST)
    acc = tl.zeros((BLOCK_X, SPLIT_D), dtype=tl.float32)

    arange_y = tl.arange(0, BLOCK_Y).to(tl.int64)  # int64 for the same reason as offs_x
    for yb in range(0, tl.cdiv(NY, BLOCK_Y)):
        offs_y = yb * BLOCK_Y + arange_y
        mask_y = offs_y < NY
        sy = tl.load(ScaleY + offs_y, mask=mask_y, other=0.0)
        dots, y_tile = _tile_dots(X, Y, x_tile, offs_x, offs_y, mask_x, mask_y, stride_x,
                                  stride_y, D, BLOCK_X, BLOCK_Y, BLOCK_D, ONE_D_CHUNK, UPCAST,
                                  INPUT_PRECISION)
        s = dots * sx2[:, None] * sy[None, :]
        valid = _unmasked(offs_x, offs_y, mask_x, mask_y, diag_offset, ids_x,
                          _load_ids(IdsY, offs_y, mask_y, HAS_IDS), EXCLUDE_DIAG, HAS_IDS)

        ds = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
        if HAS_LSE_X:
            ds += gx[:, None] * tl.exp2(s - lse_x[:, None])
        if HAS_LSE_Y:
            lse_y = tl.load(LseY + offs_y, mask=mask_y, other=float("inf")) * _LOG2E
            lse_y = tl.where(lse_y == float("-inf"), float("inf"), lse_y)
            gy = tl.load(GradY + offs_y, mask=mask_y, other=0.0)
            ds += gy[None, :] * tl.exp2(s - lse_y[None, :])
        # 0 where masked, whatever the score, the lse (NaN) and the upstream gradients.
        ds = tl.where(valid, ds, 0.0)
        # Fold scale_y into dS and divide by G = max|grad| * max|scale_y|: entries are then at most
        # 2 in magnitude (the lse values are at least this call's own), so the cast to the input
        # dtype neither overflows fp16 nor flushes the largest entries to zero; G and scale_x are
        # multiplied back in fp32 when dX is stored.
        ds = ds * (sy * inv_g)[None, :]
        if UPCAST:
            ds_in = ds
        else:
            ds_in = ds.to(Y.dtype.element_ty)  # fp16/bf16 tensor-core operand (no-op for fp32)
        if not ONE_D_CHUNK:  # this program's columns of the y rows
            y_tile = _load_rows(Y, offs_y, mask_y, stride_y, d_lo, D, SPLIT_D, UPCAST)
        acc = tl.dot(ds_in, y_tile, acc, input_precision=INPUT_PRECISION)

    dx_ptrs = DX + offs_x[:, None] * stride_dx + offs_d[None, :]
    tl.store(dx_ptrs, acc * (sx * g)[:, None], mask=mask_x[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------

# Launch configurations: rows of the outer operand per program (block_x), rows of the inner
# operand per tile (block_y), the largest D run as one chunk (the outer tile, and in backward the
# gradient accumulator, then stay on chip), the chunk size for larger D, num_warps, num_stages;
# for the backward with D in chunks, the width of each program's dX columns (split_d, below).
# The GPU values compile for sm_90 without register spills (tests/kernels/test_triton_compile.py)
# but are not yet tuned on a GPU.
# Tensor-core tiles (fp16/bf16, fp32 as tf32): FlashAttention-like 128 x 64 tiles, 8 warps.
_GPU_TENSOR_CORE = {
    "fwd": dict(block_x=128, block_y=64, max_block_d=128, chunk_d=64, num_warps=8, num_stages=3),
    # block_y 32: with 64 the id-masked variants need more than 255 registers and spill.
    "bwd": dict(block_x=128, block_y=32, max_block_d=128, chunk_d=64, num_warps=8, num_stages=2),
}
# Full-precision fp32 ("ieee"): tl.dot runs on the FMA units with operands in registers, so
# smaller tiles and chunks (larger ones spill).
# block_y 32: with 64 the forward and the id-masked backward variants spill. Forward num_stages 1:
# with 2, Triton 3.6's ptxas (the GPU image's) spills 8 bytes in two variants, 1 spills nowhere
# on 3.6 or 3.9 (not timed on a GPU; 8 warps of FMA work still hide the load latency).
_GPU_IEEE = {
    "fwd": dict(block_x=64, block_y=32, max_block_d=32, chunk_d=32, num_warps=8, num_stages=1),
    "bwd": dict(block_x=64, block_y=32, max_block_d=32, chunk_d=32, num_warps=8, num_stages=2),
}
# The interpreter runs each tile op once in numpy: few, large tiles are fastest.
_INTERPRETER = dict(block_x=64, block_y=64, max_block_d=128, chunk_d=128, num_warps=4, num_stages=1)

# Backward with D above max_block_d (D in chunks): (block_x, block_y, chunk_d, split_d, num_warps,
# num_stages). Each program keeps a block_x x split_d fp32 dX accumulator in registers; the
# scores are recomputed once per split (see the model in _masked_lse_bwd_kernel). Why this
# layout: the accumulator is what must stay on chip, and 8 warps hold at most ~32K fp32 of it
# (block_x * split_d, 128 registers a thread) beside the score tile. Keeping all of D resident
# (the one-chunk path with block_x 64 at D = 512) spills in every variant (ptxas, sm_90); a
# FlashAttention-2 dq/dk layout needs atomics on dq, a read-modify-write per key block again.
# Model at N = M = 65536, D = 512, bf16 (per kernel; 4 N M D = 8.8 TFLOP is the minimum):
#   dX accumulated in place:         4 N M D,  ~380 GB (275 GB of them fp32 dX read + written)
#   split_d 512 (S = 1), 64 x 32:    4 N M D,  ~275 GB of bf16 re-reads (L2), nothing written
#   split_d 256 (S = 2), 64 x 64:    6 N M D,  ~344 GB
#   split_d 128 (S = 4), 128 x 64:  10 N M D,  ~447 GB
# so the default is split_d 512 (no recomputation up to D = 512; S = 2 at D = 768, 1024); the
# other two are there for the autotuner, since which of L2 bandwidth and the tensor cores binds
# is for a GPU run to show (not measured yet). The first entry is the default; with
# FASTCONTRAST_TRITON_AUTOTUNE=1 on a GPU, triton.autotune picks among all of them per
# (NX, NY, D, dtype, flags); FASTCONTRAST_TRITON_CONFIG=i pins entry i.
_SPLIT_TENSOR_CORE = (
    dict(block_x=64, block_y=32, chunk_d=64, split_d=512, num_warps=8, num_stages=2),
    dict(block_x=64, block_y=64, chunk_d=64, split_d=256, num_warps=8, num_stages=2),
    dict(block_x=128, block_y=64, chunk_d=64, split_d=128, num_warps=8, num_stages=2),
)
_SPLIT_IEEE = (dict(block_x=64, block_y=32, chunk_d=32, split_d=256, num_warps=8, num_stages=2),)
AUTOTUNE_ENV = "FASTCONTRAST_TRITON_AUTOTUNE"
CONFIG_ENV = "FASTCONTRAST_TRITON_CONFIG"


def _config(which, D, precision, blocks):
    """(block_x, block_y, block_d, one_d_chunk, num_warps, num_stages) of the `which` ("fwd" or
    "bwd") launch: _common._block_config over the configs above."""
    return _block_config(D, precision, blocks, tensor_core=_GPU_TENSOR_CORE[which],
                         ieee=_GPU_IEEE[which], interpreter=_INTERPRETER)


def _split_candidates(precision):
    """The backward configs for D in chunks (the interpreter: its single config, split_d =
    chunk_d)."""
    if _INTERPRET:
        c = _INTERPRETER
        return (dict(block_x=c["block_x"], block_y=c["block_y"], chunk_d=c["chunk_d"],
                     split_d=c["chunk_d"], num_warps=c["num_warps"], num_stages=c["num_stages"]),)
    return _SPLIT_IEEE if precision == "ieee" else _SPLIT_TENSOR_CORE


def _bwd_launches(D, precision, blocks):
    """The candidate launches of the backward: [(constexpr dict, num_warps, num_stages)], one
    unless autotuning; the first is the one run without autotuning."""
    bx, by, bd, one, warps, stages = _config("bwd", D, precision, blocks)
    if one or blocks is not None:  # one chunk, or sizes given: one split per chunk
        return [(dict(BLOCK_X=bx, BLOCK_Y=by, BLOCK_D=bd, SPLIT_D=bd, ONE_D_CHUNK=one), warps,
                 stages)]
    configs = [(dict(BLOCK_X=c["block_x"], BLOCK_Y=c["block_y"], BLOCK_D=c["chunk_d"],
                     SPLIT_D=min(c["split_d"], max(16, triton.next_power_of_2(D))),
                     ONE_D_CHUNK=False), c["num_warps"], c["num_stages"])
               for c in _split_candidates(precision)]
    pinned = settings().triton_config
    if pinned is not None:
        if pinned >= len(configs):
            raise ValueError(f"{CONFIG_ENV} must be an index below {len(configs)}, got {pinned}")
        return [configs[pinned]]
    if settings().triton_autotune and not _INTERPRET:
        return configs
    return configs[:1]


_AUTOTUNED = {}


def _launch_bwd(grid_rows, D, launches, args, flags):
    """Launch _masked_lse_bwd_kernel over grid (cdiv(grid_rows, BLOCK_X), cdiv(D, SPLIT_D)): with
    the single launch given, or autotuned over several (kernel outputs are written, never
    accumulated, so the autotuner's repeated runs are harmless)."""
    if len(launches) == 1:
        meta, warps, stages = launches[0]
        grid = (triton.cdiv(grid_rows, meta["BLOCK_X"]), triton.cdiv(D, meta["SPLIT_D"]))
        _masked_lse_bwd_kernel[grid](*args, **meta, **flags, num_warps=warps, num_stages=stages)
        return
    key = tuple((tuple(sorted(m.items())), w, st) for m, w, st in launches)
    if key not in _AUTOTUNED:
        configs = [triton.Config(m, num_warps=w, num_stages=st) for m, w, st in launches]
        _AUTOTUNED[key] = triton.autotune(
            configs=configs, key=["NX", "NY", "D", "EXCLUDE_DIAG", "HAS_IDS", "HAS_LSE_X",
                                  "HAS_LSE_Y"])(_masked_lse_bwd_kernel)
    grid = lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_X"]),  # noqa: E731
                         triton.cdiv(D, meta["SPLIT_D"]))
    _AUTOTUNED[key][grid](*args, **flags)


def _check_vector(name, t, length, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of q), got {t.device}")
    if length > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _check_operands(q, keys, alpha, beta):
    """Validate q/keys/alpha/beta; return (N, M, D)."""
    _check_matrix("q", q)
    _check_matrix("keys", keys)
    if keys.dtype != q.dtype:
        raise TypeError(f"keys must have the dtype of q ({q.dtype}), got {keys.dtype}")
    if keys.shape[1] != q.shape[1]:
        raise ValueError(f"keys must have D = {q.shape[1]} columns like q, got shape "
                         f"{tuple(keys.shape)}")
    if keys.device != q.device:
        raise ValueError(f"keys must be on {q.device} (the device of q), got {keys.device}")
    _check_device("q", q.device)
    N, D = q.shape
    M = keys.shape[0]
    _check_vector("alpha", alpha, N, q.device)
    _check_vector("beta", beta, M, q.device)
    return N, M, D


def _check_ids(row_ids, col_ids, N, M, device):
    """True when both id vectors are given (validated: int64 (N,) / (M,) on device)."""
    if (row_ids is None) != (col_ids is None):
        raise ValueError("row_ids and col_ids must be given together (both or neither), got "
                         f"row_ids={'None' if row_ids is None else 'tensor'}, "
                         f"col_ids={'None' if col_ids is None else 'tensor'}")
    if row_ids is None:
        return False
    check_ids("row_ids", row_ids, N, device)
    check_ids("col_ids", col_ids, M, device)
    if row_ids.stride(0) != 1 or col_ids.stride(0) != 1:
        raise ValueError("row_ids and col_ids must be contiguous")
    return True


def masked_lse_forward(q, keys, alpha, beta, *, exclude_diag=False, diag_offset=0, row_ids=None,
                       col_ids=None, with_col_lse=False, blocks=None):
    """Row (and optionally column) log-sum-exp of s_ij = alpha_i * beta_j * <q_i, keys_j>.

    q: (N, D), keys: (M, D), same dtype (float16, bfloat16, float32) and device, rows contiguous.
    alpha: (N,) float32, beta: (M,) float32. Entry (i, j) is masked iff exclude_diag and
    j == i + diag_offset, or row_ids[i] == col_ids[j] >= 0 (int64 (N,), (M,), both or neither).
    Returns (row_lse (N,) float32, col_lse (M,) float32 or None); a row or
    column without candidates gets -inf. `blocks` optionally overrides (block_rows, block_keys,
    block_d). The column lse is merged across programs in scheduling order, so its last bits may
    vary from run to run on GPU; row_lse is deterministic."""
    N, M, D = _check_operands(q, keys, alpha, beta)
    dev = q.device
    has_ids = _check_ids(row_ids, col_ids, N, M, dev)
    row_lse = new_output(N, torch.float32, dev)
    col_lse = None
    if N == 0 or M == 0:
        row_lse.fill_(float("-inf"))
        if with_col_lse:
            col_lse = torch.full((M,), float("-inf"), dtype=torch.float32, device=dev)
        return row_lse, col_lse

    precision = _input_precision(q.dtype)
    block_n, block_m, block_d, one_chunk, warps, stages = _config("fwd", D, precision, blocks)
    if with_col_lse:
        col_max = torch.full((M,), float("-inf"), dtype=torch.float32, device=dev)
        col_sum = torch.zeros(M, dtype=torch.float32, device=dev)
        lock = torch.zeros(triton.cdiv(M, block_m), dtype=torch.int32, device=dev)
    else:  # never dereferenced when HAS_COL is False
        col_max = col_sum = lock = row_lse
    grid = (triton.cdiv(N, block_n),)
    with _device_context(q):
        _masked_lse_fwd_kernel[grid](
            q, keys, alpha, beta, row_ids if has_ids else alpha, col_ids if has_ids else beta,
            row_lse, col_max, col_sum, lock,
            N, M, D, q.stride(0), keys.stride(0), int(diag_offset),
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, EXCLUDE_DIAG=bool(exclude_diag),
            HAS_IDS=has_ids, HAS_COL=bool(with_col_lse), ONE_D_CHUNK=one_chunk,
            UPCAST=_upcast(q.dtype), INPUT_PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )
    if with_col_lse:
        # col_lse = ln2 * (max + log2(sum)); no candidate: -inf + log2(0) = -inf.
        col_lse = col_sum.log2_().add_(col_max).mul_(math.log(2.0))
    return row_lse, col_lse


def masked_lse_backward(q, keys, alpha, beta, row_lse, row_grad, col_lse=None, col_grad=None, *,
                        exclude_diag=False, diag_offset=0, row_ids=None, col_ids=None, need_dq=True,
                        need_dkeys=True, blocks=None):
    """Gradient of sum_i row_grad_i * row_lse_i (+ sum_j col_grad_j * col_lse_j) w.r.t. q and keys.

    dS_ij = row_grad_i * exp(s_ij - row_lse_i) + col_grad_j * exp(s_ij - col_lse_j) (second term
    only when col_lse is given), 0 where masked (as in masked_lse_forward); an lse of -inf
    contributes 0.
    dq_i = alpha_i * sum_j dS_ij beta_j keys_j;  dkeys_j = beta_j * sum_i dS_ij alpha_i q_i.
    row_lse/col_lse may be larger than this pair's own lse (global lse over more candidates).
    Returns (dq (N, D) float32 or None, dkeys (M, D) float32 or None); deterministic."""
    N, M, D = _check_operands(q, keys, alpha, beta)
    dev = q.device
    _check_vector("row_lse", row_lse, N, dev)
    _check_vector("row_grad", row_grad, N, dev)
    has_ids = _check_ids(row_ids, col_ids, N, M, dev)
    if (col_lse is None) != (col_grad is None):
        raise ValueError("col_lse and col_grad must be given together (both or neither), got "
                         f"col_lse={'None' if col_lse is None else 'tensor'}, "
                         f"col_grad={'None' if col_grad is None else 'tensor'}")
    has_col = col_lse is not None
    if has_col:
        _check_vector("col_lse", col_lse, M, dev)
        _check_vector("col_grad", col_grad, M, dev)

    dq = new_output((N, D), torch.float32, dev) if need_dq else None
    dkeys = new_output((M, D), torch.float32, dev) if need_dkeys else None
    if N == 0 or M == 0 or D == 0:
        for t in (dq, dkeys):
            if t is not None:
                t.zero_()
        return dq, dkeys

    gmax = row_grad.abs().amax()
    if has_col:
        gmax = torch.maximum(gmax, col_grad.abs().amax())
    precision = _input_precision(q.dtype)
    launches = _bwd_launches(D, precision, blocks)
    flags = dict(EXCLUDE_DIAG=bool(exclude_diag), HAS_IDS=has_ids, UPCAST=_upcast(q.dtype),
                 INPUT_PRECISION=precision)
    # Unused pointer arguments (HAS_LSE_* False) point at a tensor that exists; never read.
    col_lse_arg = col_lse if has_col else row_lse
    col_grad_arg = col_grad if has_col else row_grad
    row_ids_arg, col_ids_arg = (row_ids, col_ids) if has_ids else (alpha, beta)
    with _device_context(q):
        if need_dq:  # outer = q (row terms), inner = keys (column terms)
            _launch_bwd(N, D, launches, (
                q, keys, dq, alpha, beta, row_ids_arg, col_ids_arg, row_lse, row_grad, col_lse_arg,
                col_grad_arg, _grad_scale(gmax * beta.abs().amax()),
                N, M, D, q.stride(0), keys.stride(0), dq.stride(0), int(diag_offset),
            ), dict(HAS_LSE_X=True, HAS_LSE_Y=has_col, **flags))
        if need_dkeys:  # outer = keys (column terms), inner = q (row terms); mask i == j - offset
            _launch_bwd(M, D, launches, (
                keys, q, dkeys, beta, alpha, col_ids_arg, row_ids_arg, col_lse_arg, col_grad_arg,
                row_lse, row_grad, _grad_scale(gmax * alpha.abs().amax()),
                M, N, D, keys.stride(0), q.stride(0), dkeys.stride(0), -int(diag_offset),
            ), dict(HAS_LSE_X=has_col, HAS_LSE_Y=True, **flags))
    return dq, dkeys
