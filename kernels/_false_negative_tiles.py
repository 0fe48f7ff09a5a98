"""@triton.jit piece of the false-negative filter (fastcontrast/infonce/false_negatives.py) in
the masked log-sum-exp kernels (kernels/_masked_lse_kernels.py): which candidates of a
(query, key) tile are dropped. Candidate (i, j) is dropped iff j != positive_col_i and

    s_ij > threshold_i                    (HAS_THRESHOLD; s in log2 units, so the threshold is
                                           multiplied by log2(e) here)
    or <guide_q_i, guide_keys_j> > guide_threshold_i   (HAS_GUIDE; the guide's dots computed here,
                                           tile by tile over G in BLOCK_G chunks, never stored)

The kernels compile the filter only under their FILTER constexpr, so the plain kernels are
unchanged."""
import triton
import triton.language as tl

from ._common import _dot_rows
from ._lse_tiles import LOG2E


@triton.jit
def dropped_candidates(s2, offs_q, offs_k, mask_q, mask_k, Thr, Pos, GQ, GK, GThr,
                       stride_gq, stride_gk, G,
                       BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr,
                       HAS_THRESHOLD: tl.constexpr, HAS_GUIDE: tl.constexpr,
                       HAS_POS: tl.constexpr, UPCAST: tl.constexpr,
                       INPUT_PRECISION: tl.constexpr):
    """(BLOCK_Q, BLOCK_K) int1: the dropped entries of the tile of queries offs_q against keys
    offs_k, s2 its scores in log2 units in that orientation (rows outside the matrix: never)."""
    drop = tl.zeros((BLOCK_Q, BLOCK_K), dtype=tl.int32)
    if HAS_THRESHOLD:
        thr = tl.load(Thr + offs_q, mask=mask_q, other=float("inf")) * LOG2E
        drop = drop | (s2 > thr[:, None]).to(tl.int32)
    if HAS_GUIDE:
        g = _dot_rows(GQ, GK, offs_q, offs_k, mask_q, mask_k, stride_gq, stride_gk, G,
                      BLOCK_Q, BLOCK_K, BLOCK_G, UPCAST, INPUT_PRECISION)
        gthr = tl.load(GThr + offs_q, mask=mask_q, other=float("inf"))
        drop = drop | (g > gthr[:, None]).to(tl.int32)
    if HAS_POS:  # the positive is never dropped
        pos = tl.load(Pos + offs_q, mask=mask_q, other=-1)
        drop = drop & (offs_k[None, :] != pos[:, None]).to(tl.int32)
    keep_rows = (mask_q[:, None] & mask_k[None, :]).to(tl.int32)
    return (drop & keep_rows) != 0
