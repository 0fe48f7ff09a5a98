"""The @triton.jit kernels of the masked log-sum-exp over similarity tiles, and of its gradient:
the Triton core of the InfoNCE losses (their host functions are in kernels/infonce.py).

Over candidate pairs (i, j) of the scores

    s_ij = alpha_i * beta_j * <q_i, keys_j>

  - ``_masked_lse_fwd_kernel``: row_lse_i = logsumexp_j s_ij, and with HAS_COL the per-column
    (max, sum) from which the host forms col_lse_j = logsumexp_i s_ij. Grid over row blocks;
    each program loops over all key blocks and keeps a running (max, sum) per row. With HAS_COL
    it also reduces every tile over its rows and merges the per-column (max, sum) into global fp32
    buffers under a per-key-block spin lock, so the symmetric (CLIP) loss gets both directions
    from one pass over the tiles.
  - ``_masked_lse_bwd_kernel``: dX_i = scale_x_i sum_j dS_ij scale_y_j y_j with
    dS_ij = gx_i exp(s_ij - lse_x_i) + gy_j exp(s_ij - lse_y_j): the gradient with respect to one
    operand ("outer", X), looping over the other ("inner", Y). Launched twice: X = q (dq, grid
    over row blocks) and X = keys (dkeys, grid over key blocks, the tile seen transposed). Each
    program owns a block of its output (rows x a split of the D columns) and accumulates it on
    chip, so no atomics, no read-modify-write of dX in global memory, and the result is
    deterministic.
With FILTER (a constexpr: the plain kernels compile without it) the false-negative filter drops
candidates tile by tile (kernels/_false_negative_tiles.py): the forward gives them no term (and
with COUNT counts them per row), the backward zero weight. Each kernel's docstring gives its FLOP
and memory-traffic model. The candidate mask, the online row update and the locked column merge
are kernels/_lse_tiles.py's (shared with kernels/gram.py); the tile loads and dot products
kernels/_common.py's.
"""
import triton
import triton.language as tl

from ._common import _load_rows, _tile_dots
from ._false_negative_tiles import filter_drops
from ._lse_tiles import (LN2, LOG2E, load_ids, merge_column_stats, online_row_lse,
                         scaled_masked_scores, unmasked)


@triton.jit
def _masked_lse_fwd_kernel(
    Q, K, Alpha, Beta,          # q (N, D), keys (M, D) row-major; alpha (N,), beta (M,) fp32
    RowIds, ColIds,             # HAS_IDS only: (N,), (M,) int64; (i, j) masked iff equal and >= 0
    RowLse,                     # out: (N,) fp32, natural log
    ColMax, ColSum, Lock,       # HAS_COL only: (M,) fp32 running max (log2 units, init -inf),
                                # (M,) fp32 running sum (init 0),
                                # (cdiv(M, BLOCK_M),) int32 locks (init 0)
    N, M, D, stride_q, stride_k, diag_offset,
    Thr, Pos, GQ, GK, GThr, Dropped,  # FILTER only: the filter (kernels/_false_negative_tiles.py)
    stride_gq, stride_gk, G,          # and with COUNT the (N,) int32 dropped counts (out)
    CThr, CPos, CGThr, ColDropped,    # COL_RULE only: the column rule, (M,) int32 counts (out)
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, HAS_IDS: tl.constexpr, HAS_COL: tl.constexpr,
    ONE_D_CHUNK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    FILTER: tl.constexpr = False, HAS_THRESHOLD: tl.constexpr = False,
    HAS_GUIDE: tl.constexpr = False, HAS_POS: tl.constexpr = False, COUNT: tl.constexpr = False,
    BLOCK_G: tl.constexpr = 16, COL_RULE: tl.constexpr = False,
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
    a2 = tl.load(Alpha + offs_n, mask=mask_n, other=0.0) * LOG2E
    ids_n = load_ids(RowIds, offs_n, mask_n, HAS_IDS)
    # With ONE_D_CHUNK the row block is one chunk: loaded once, kept for all key blocks (else
    # unused: the compiler drops the load).
    q_tile = _load_rows(Q, offs_n, mask_n, stride_q, 0, D, BLOCK_D, UPCAST)

    dropped = tl.zeros((BLOCK_N,), dtype=tl.int32)
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
        s = scaled_masked_scores(dots, a2, b, offs_n, offs_m, mask_n, mask_m, diag_offset, ids_n,
                                 load_ids(ColIds, offs_m, mask_m, HAS_IDS), EXCLUDE_DIAG, HAS_IDS)
        s_col = s
        if FILTER:  # masked entries (-inf) are no candidates: neither dropped nor counted
            drop, col_drop = filter_drops(s, offs_n, offs_m, mask_n, mask_m, Thr, Pos, GQ, GK,
                                          GThr, CThr, CPos, CGThr, stride_gq, stride_gk, G,
                                          BLOCK_N, BLOCK_M, BLOCK_G, HAS_THRESHOLD, HAS_GUIDE,
                                          HAS_POS, COL_RULE, UPCAST, INPUT_PRECISION)
            live = s != float("-inf")
            drop = drop & live
            if COL_RULE:  # each direction's own drops, from the same scores
                col_drop = col_drop & live
                s_col = tl.where(col_drop, float("-inf"), s)
                if COUNT:
                    tl.atomic_add(ColDropped + offs_m, tl.sum(col_drop.to(tl.int32), axis=0),
                                  mask=mask_m)
            s = tl.where(drop, float("-inf"), s)
            if not COL_RULE:
                s_col = s
            if COUNT:
                dropped += tl.sum(drop.to(tl.int32), axis=1)

        m_i, l_i = online_row_lse(m_i, l_i, s)
        if HAS_COL:  # this tile's column (max, sum), from the same scores
            merge_column_stats(s_col, ColMax, ColSum, Lock, kb, offs_m, mask_m)

    # lse = ln(2) * (m + log2(l)); no candidate: m = -inf and l = 0 give -inf.
    row_lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(RowLse + offs_n, row_lse, mask=mask_n)
    if COUNT:
        tl.store(Dropped + offs_n, dropped, mask=mask_n)


@triton.jit
def _masked_lse_bwd_kernel(
    X, Y, DX,                   # outer operand (NX, D), inner operand (NY, D); out: dX (NX, D) fp32
    ScaleX, ScaleY,             # (NX,), (NY,) fp32: s_ij = scale_x_i * scale_y_j * <x_i, y_j>
    IdsX, IdsY,                 # HAS_IDS only: (NX,), (NY,) int64; (i, j) masked iff equal and >= 0
    LseX, GradX,                # HAS_LSE_X: (NX,) fp32 lse and upstream grad of the outer side
    LseY, GradY,                # HAS_LSE_Y: (NY,) fp32 lse and upstream grad of the inner side
    GradScale,                  # (1,) fp32 G > 0: dS * scale_y is divided by G before the cast
    NX, NY, D, stride_x, stride_y, stride_dx, diag_offset,
    Thr, Pos, GQ, GK, GThr,     # FILTER only: the filter of the queries (X with FILTER_ON_X,
    stride_gq, stride_gk, G,    # else Y) against the keys (kernels/_false_negative_tiles.py)
    CThr, CPos, CGThr,          # COL_RULE only: the column rule (the keys' side's terms)
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, SPLIT_D: tl.constexpr,
    EXCLUDE_DIAG: tl.constexpr, HAS_IDS: tl.constexpr, HAS_LSE_X: tl.constexpr,
    HAS_LSE_Y: tl.constexpr, ONE_D_CHUNK: tl.constexpr, UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    FILTER: tl.constexpr = False, FILTER_ON_X: tl.constexpr = True,
    HAS_THRESHOLD: tl.constexpr = False, HAS_GUIDE: tl.constexpr = False,
    HAS_POS: tl.constexpr = False, BLOCK_G: tl.constexpr = 16, COL_RULE: tl.constexpr = False,
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
    sx2 = sx * LOG2E  # scores in log2 units
    ids_x = load_ids(IdsX, offs_x, mask_x, HAS_IDS)
    g = tl.load(GradScale)
    inv_g = 1.0 / g
    if HAS_LSE_X:
        # An lse of -inf (no candidate) becomes +inf: exp2(s - inf) = 0, never -inf - (-inf).
        lse_x = tl.load(LseX + offs_x, mask=mask_x, other=float("inf")) * LOG2E
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
        valid = unmasked(offs_x, offs_y, mask_x, mask_y, diag_offset, ids_x,
                         load_ids(IdsY, offs_y, mask_y, HAS_IDS), EXCLUDE_DIAG, HAS_IDS)
        if FILTER:
            if FILTER_ON_X:  # dq: the queries are the tile's rows, the X side's term the row's
                drop_x, drop_y = filter_drops(
                    s, offs_x, offs_y, mask_x, mask_y, Thr, Pos, GQ, GK, GThr, CThr, CPos, CGThr,
                    stride_gq, stride_gk, G, BLOCK_X, BLOCK_Y, BLOCK_G, HAS_THRESHOLD, HAS_GUIDE,
                    HAS_POS, COL_RULE, UPCAST, INPUT_PRECISION)
            else:  # dkeys: the queries are the tile's columns, the X side's term the column's
                drop_y, drop_x = filter_drops(
                    tl.trans(s), offs_y, offs_x, mask_y, mask_x, Thr, Pos, GQ, GK, GThr, CThr,
                    CPos, CGThr, stride_gq, stride_gk, G, BLOCK_Y, BLOCK_X, BLOCK_G,
                    HAS_THRESHOLD, HAS_GUIDE, HAS_POS, COL_RULE, UPCAST, INPUT_PRECISION)
                drop_x = tl.trans(drop_x)
                drop_y = tl.trans(drop_y)
            if not COL_RULE:  # one rule: the entry leaves both terms
                valid = valid & (drop_x == 0)

        ds = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
        if HAS_LSE_X:
            term_x = gx[:, None] * tl.exp2(s - lse_x[:, None])
            if COL_RULE:  # the row and the column rule mask their own lse's term
                term_x = tl.where(drop_x, 0.0, term_x)
            ds += term_x
        if HAS_LSE_Y:
            lse_y = tl.load(LseY + offs_y, mask=mask_y, other=float("inf")) * LOG2E
            lse_y = tl.where(lse_y == float("-inf"), float("inf"), lse_y)
            gy = tl.load(GradY + offs_y, mask=mask_y, other=0.0)
            term_y = gy[None, :] * tl.exp2(s - lse_y[None, :])
            if COL_RULE:
                term_y = tl.where(drop_y, 0.0, term_y)
            ds += term_y
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
