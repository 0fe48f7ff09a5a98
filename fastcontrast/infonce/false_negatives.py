"""False-negative filtering of the InfoNCE family, decided inside the kernels' tiles: a candidate
that looks like a second positive is dropped from row i's denominator (no term in the forward
log-sum-exp, zero probability in the backward). Two rules, either or both:

    margin m (Qwen3-Embedding):  j != t_i dropped iff  <q^_i, k^_j> > <q^_i, k^_{t_i}> + m
        in similarity units before the temperature (q^, k^ normalised when the loss normalises;
        raw inner products otherwise, e.g. clip_loss); in scores s = scale <q^, k^>:
        s_ij > s_{i,t_i} + scale m.
    guide (GISTEmbed):  j != t_i dropped iff  g_ij > thr_i,  g_ij = cos(gq_i, gk_j) the guide
        model's similarity, thr_i = g_{i,t_i} - margin ("absolute")
                            or thr_i = g_{i,t_i} - |g_{i,t_i}| margin ("relative"),
        sentence-transformers' GISTEmbedLoss(margin_strategy, margin).

The per-row thresholds are computed up front in O((N + M) D) (the positive's score, the guide's
positive similarity); the kernels compare each tile's scores with them (guide scores: one more
product per tile, never stored). The positive itself is never dropped. Bank entries (info_nce's
negatives, moco_loss's queue) are candidates too; the guide then needs their guide features.
A symmetric loss (CLIP, N == M, the positive of row i is column i and of column j row j)
filters each direction with its own positive in ONE fused pass: each score tile is computed
once, entry (i, j), i != j, leaves row i's log-sum-exp iff it passes row i's thresholds and
column j's iff it passes column j's (s_ij > s_jj + scale m; g_ij > thr_j), the backward masks
the row and the column probabilities apart in the same recomputed tile. For CLIP the column
thresholds are the row thresholds' vector (column j's positive is row j), so the kernels' column
rule (ops.py) gets the same tensors.
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .._host import accumulate_dtype, rowwise_dot
from .function import fused_loss
from .operands import positive_scores, prepare, product_of
from .ops import masked_lse_dropped

__all__ = ["FalseNegatives", "LseFilter", "kernel_filter", "filtered_loss", "dropped_counts",
           "unit_guide", "guide_thresholds", "GUIDE_STRATEGIES"]

GUIDE_STRATEGIES = ("absolute", "relative")


class FalseNegatives(NamedTuple):
    """The filter of one call: ``margin`` (None: no margin rule), the guide features of the
    queries (N, G), keys (M, G) and bank (K, G) (None: no guide rule / no bank) and the guide's
    margin options."""

    margin: Optional[float]
    guide_query: Optional[Tensor] = None
    guide_key: Optional[Tensor] = None
    guide_bank: Optional[Tensor] = None
    guide_margin: float = 0.0
    guide_strategy: str = "absolute"

    @property
    def has_guide(self):
        return self.guide_query is not None

    def kernel_filter(self, operands, fused_pass, positive, targets):
        """The LseFilter of this filter for a pass's operands and positive scores."""
        return kernel_filter(self, operands, fused_pass, positive, targets)

    def transposed(self):
        """The filter of the key -> query direction (CLIP's columns): the guide's roles swapped."""
        return self._replace(guide_query=self.guide_key, guide_key=self.guide_query)


class LseFilter(NamedTuple):
    """The filter as the kernel ops take it (fastcontrast/infonce/ops.py): per-row thresholds in
    the scale dtype, the positive's column of the product (None: not in the product), the
    normalised guide features in the compute dtype; with the column rule (a symmetric pass) the
    columns' thresholds (M,) and the row of each column's positive (M,)."""

    threshold: Optional[Tensor]
    positive_col: Optional[Tensor]
    guide_q: Optional[Tensor]
    guide_keys: Optional[Tensor]
    guide_threshold: Optional[Tensor]
    col_threshold: Optional[Tensor] = None
    col_positive_row: Optional[Tensor] = None
    col_guide_threshold: Optional[Tensor] = None

    def keywords(self):
        """The ops' keywords: the column rule's only where there is one (the one-directional ops,
        masked_lse_forward_with_grad, take none)."""
        given = self._asdict()
        if self.col_positive_row is None:
            for name in ("col_threshold", "col_positive_row", "col_guide_threshold"):
                del given[name]
        return given


def unit_guide(t, dtype):
    """The guide features as the kernels take them: detached, unit rows, in ``dtype``."""
    return F.normalize(t.detach().to(accumulate_dtype(t.dtype)), dim=-1).to(dtype)


def guide_thresholds(fn, guide_q, positive_guide_key, acc):
    """thr_i of the guide rule (``acc`` dtype) from the unit guide rows of the queries and of
    their positives: g_{i,t_i} - margin ("absolute") or g_{i,t_i} - |g_{i,t_i}| margin."""
    similarity = rowwise_dot(guide_q, positive_guide_key).to(acc)
    if fn.guide_strategy == "absolute":
        return similarity - fn.guide_margin
    return similarity - similarity.abs() * fn.guide_margin


def kernel_filter(fn, operands, fused_pass, positive, targets):
    """The LseFilter of FalseNegatives ``fn`` for a pass's operands and positive scores."""
    n, device = operands.query.shape[0], operands.query.device
    acc = operands.alpha.dtype
    threshold = None
    if fn.margin is not None:
        threshold = (positive.to(acc) + operands.scale * fn.margin).contiguous()
    positive_col = None
    if fused_pass.in_batch_negatives:
        positive_col = torch.arange(n, device=device) if targets is None else targets
    guide_q = guide_keys = guide_threshold = None
    if fn.has_guide:
        cdt = operands.query.dtype
        guide_q = unit_guide(fn.guide_query, cdt)
        guide_key = unit_guide(fn.guide_key, cdt)
        positive_key = guide_key if targets is None else guide_key.index_select(0, targets)
        guide_threshold = guide_thresholds(fn, guide_q, positive_key, acc)
        parts = [guide_key] if fused_pass.in_batch_negatives else []
        if fn.guide_bank is not None:
            parts.append(unit_guide(fn.guide_bank, cdt))
        guide_keys = torch.cat(parts) if len(parts) > 1 else parts[0] if parts else None
        if guide_keys is None:  # no product: the positive alone, nothing to filter
            guide_q = guide_threshold = None
    if not fused_pass.symmetric:
        return LseFilter(threshold, positive_col, guide_q, guide_keys, guide_threshold)
    # CLIP (M == N, validated): column j's positive is row j, its thresholds those of row j.
    return LseFilter(threshold, positive_col, guide_q, guide_keys, guide_threshold,
                     col_threshold=threshold, col_positive_row=torch.arange(n, device=device),
                     col_guide_threshold=guide_threshold)


def dropped_counts(fused_pass, fn, query, key, *, scale, bank=None, targets=None,
                   query_ids=None, bank_ids=None):
    """int64 (N,): the candidates of each row that ``fn`` drops (ids-masked entries are no
    candidates and are not counted); symmetric (2, N): row 0 the rows', row 1 the columns'. One
    pass over the tiles without exps."""
    with torch.no_grad():
        operands = prepare(fused_pass, query, key, bank, None, scale)
        product = product_of(operands, fused_pass, targets, query_ids, bank_ids)
        if product.keys is None:
            return torch.zeros(query.shape[0], dtype=torch.int64, device=query.device)
        positive = positive_scores(operands, targets)
        lse_filter = kernel_filter(fn, operands, fused_pass, positive, targets)
        counts = masked_lse_dropped(operands.query, product.keys, operands.alpha, product.beta,
                                    product.row_ids, product.col_ids,
                                    fused_pass.excludes_diagonal, 0, fused_pass.backend,
                                    *lse_filter)
        return counts.view(2, -1) if fused_pass.symmetric else counts


def filtered_loss(fused_pass, fn, query, key, *, scale, bank=None, targets=None, query_ids=None,
                  bank_ids=None, return_dropped=False):
    """The InfoNCE loss of ``fused_pass`` with false-negative filter ``fn``; symmetric (M == N,
    no targets, no bank: validated): the mean of the two directions, each filtered with its own
    positive, in one fused pass. With ``return_dropped`` (loss, dropped): int64 (N,) dropped
    candidates per row; symmetric (2, N), row 0 the query -> key direction, row 1 key -> query."""
    terms = dict(scale=scale, bank=bank, targets=targets, query_ids=query_ids, bank_ids=bank_ids)
    loss = fused_loss(fused_pass, query, key, false_negatives=fn, **terms)
    if not return_dropped:
        return loss
    return loss, dropped_counts(fused_pass, fn, query, key, **terms)
