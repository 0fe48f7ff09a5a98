"""@triton.jit piece of the false-negative filter (fastcontrast/infonce/false_negatives.py) in
the masked log-sum-exp kernels (kernels/_masked_lse_kernels.py): which candidates of a
(query, key) tile are dropped. Candidate (i, j) is dropped from row i iff j != positive_col_i and

    s_ij > threshold_i                    (HAS_THRESHOLD; s in log2 units, so the threshold is
                                           multiplied by log2(e) here)
    or <guide_q_i, guide_keys_j> > guide_threshold_i   (HAS_GUIDE; the guide's dots computed here,
                                           tile by tile over G in BLOCK_G chunks, never stored)

and, with COL_RULE (a symmetric loss in one pass), from column j iff i != col_positive_row_j and
s_ij > col_threshold_j or <guide_q_i, guide_keys_j> > col_guide_threshold_j: the same scores and
guide dots, the column's thresholds. The kernels compile the filter only under their FILTER
constexpr, so the plain kernels are unchanged."""
import triton
import triton.language as tl

from ._common import _dot_rows
from ._lse_tiles import LOG2E


@triton.jit
def filter_drops(s2, offs_q, offs_k, mask_q, mask_k, Thr, Pos, GQ, GK, GThr, CThr, CPos, CGThr,
                 stride_gq, stride_gk, G,
                 BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
                 HAS_THRESHOLD: tl.constexpr, HAS_GUIDE: tl.constexpr, HAS_POS: tl.constexpr,
                 COL_RULE: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """(row drops, column drops): (BLOCK_Q, BLOCK_K) int1 each, the dropped entries of the tile
    of queries offs_q against keys offs_k by the row rule and by the column rule (without
    COL_RULE the row drops twice), s2 its scores in log2 units in that orientation (entries
    outside the matrix: never)."""
    row = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.int32)
    col = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.int32)
    if HAS_THRESHOLD:
        thr = tl.load(Thr + offs_q, mask=mask_q, other=float("inf")) * LOG2E
        row = row | (s2 > thr[:, None]).to(tl.int32)
        if COL_RULE:
            cthr = tl.load(CThr + offs_k, mask=mask_k, other=float("inf")) * LOG2E
            col = col | (s2 > cthr[None, :]).to(tl.int32)
    if HAS_GUIDE:
        g = _dot_rows(GQ, GK, offs_q, offs_k, mask_q, mask_k, stride_gq, stride_gk, G,
                      BLOCK_Q, BLOCK_K, BLOCK_G, UPCAST, INPUT_PRECISION)
        gthr = tl.load(GThr + offs_q, mask=mask_q, other=float("inf"))
        row = row | (g > gthr[:, None]).to(tl.int32)
        if COL_RULE:
            cgthr = tl.load(CGThr + offs_k, mask=mask_k, other=float("inf"))
            col = col | (g > cgthr[None, :]).to(tl.int32)
    if HAS_POS:  # the positive is never dropped
        pos = tl.load(Pos + offs_q, mask=mask_q, other=-1)
        row = row & (offs_k[None, :] != pos[:, None]).to(tl.int32)
    keep = (mask_q[:, None] & mask_k[None, :]).to(tl.int32)
    if COL_RULE:  # the column's positive row is never dropped from it
        cpos = tl.load(CPos + offs_k, mask=mask_k, other=-1)
        col = col & (offs_q[:, None] != cpos[None, :]).to(tl.int32)
        return (row & keep) != 0, (col & keep) != 0
    return (row & keep) != 0, (row & keep) != 0
