"""Label smoothing of the InfoNCE family, from sums of keys (no N x M scores):

    loss_i = (1 - eps)(lse_i - s_{i,t_i}) + eps (lse_i - mean_{j in C(i)} s_ij)
           = (lse_i - s_{i,t_i}) + eps gap_i,     gap_i = s_{i,t_i} - mean_{j in C(i)} s_ij

equal to F.cross_entropy(logits, targets, label_smoothing=eps) on the materialised logits with
the candidates C(i) as the classes (masked entries are not classes). The fused pass gives the
first term; gap_i is linear in the scores, so

    mean_{j in C(i)} s_ij = scale <q^_i, sum_{j in C(i)} k^_j> / |C(i)|

where the candidate sum is the sum of every key, minus key i under exclude_self, plus the bank
minus its entries with the query's id, plus the row's per-query negatives (only key t_i without
in-batch negatives). Everything here is O((N + M + K) D), with plain autograd. A symmetric loss
(CLIP) smooths both directions: loss_i gets eps (gap_i + gap'_i) / 2, gap'_i the column term of
key i over the queries.

Without a bank or per-query negatives the gap is in_batch_gap.py's autograd.Function, whose
backward holds one (R, D) buffer per input instead of plain autograd's temporaries."""
import torch

from .._host import accumulate_dtype, class_index, rowwise_dot
from .in_batch_gap import (in_batch_gap, in_batch_sums, inverse_norms, positive_dots, times,
                           unit_sum)

__all__ = ["smoothing_gap", "gap_from_sums", "same_id_bank_sums"]


def same_id_bank_sums(query_ids, bank_ids, bank):
    """(sum, count) per query of the bank entries whose id equals the query's (>= 0)."""
    n = query_ids.shape[0]
    cls = class_index(torch.cat([query_ids, bank_ids]))
    sums = bank.new_zeros(cls.shape[0], bank.shape[1]).index_add(0, cls[n:], bank)
    counts = bank.new_zeros(cls.shape[0]).index_add(0, cls[n:], bank.new_ones(bank.shape[0]))
    matches = (query_ids >= 0).to(bank.dtype)
    return sums[cls[:n]] * matches.unsqueeze(1), counts[cls[:n]] * matches


def gap_from_sums(q, positive_key, candidate_sum, candidate_count):
    """gap_i / scale = <q^_i, k^_{t_i} - (candidate sum of row i) / |C(i)|> for unit rows
    (candidate_sum (N, D), or (D,) where every row has the same)."""
    summed = q @ candidate_sum if candidate_sum.dim() == 1 else rowwise_dot(q, candidate_sum)
    return rowwise_dot(q, positive_key) - summed / candidate_count


def _row_gap(options, q, k, norms, bank, per_query, targets, query_ids, bank_ids):
    """gap_i / scale of row i (gap_from_sums) from the raw rows and their inverse norms
    ``norms`` = (query, key, bank, per_query) (None: no normalisation): every sum is of
    products <q_i, .>, scaled afterwards, so the only (N, D) temporaries are the positive keys
    under ``targets`` and the same-id bank sums."""
    inv_q, inv_k, inv_b, inv_p = norms
    n = q.shape[0]
    positive = positive_dots(q, k, inv_k, targets)
    if options.in_batch_negatives:
        summed, count = in_batch_sums(q, k, inv_k, options.exclude_self)
        count = q.new_full((n,), float(count))
    else:
        summed, count = positive, q.new_ones(n)
    if bank is not None:
        summed = summed + q @ unit_sum(bank, inv_b)
        count = count + bank.shape[0]
        if query_ids is not None:
            unit_bank = bank if inv_b is None else bank * inv_b.unsqueeze(1)
            same_sum, same_count = same_id_bank_sums(query_ids, bank_ids, unit_bank)
            summed, count = summed - rowwise_dot(q, same_sum), count - same_count
    if per_query is not None:
        per_query_dots = torch.einsum("nkd,nd->nk", per_query, q)
        summed = summed + times(per_query_dots, inv_p).sum(dim=1)
        count = count + per_query.shape[1]
    return times(positive - summed / count, inv_q)


def smoothing_gap(options, query, key, *, scale, bank=None, per_query=None, targets=None,
                  query_ids=None, bank_ids=None):
    """Per-row gap_i (N,) of the module docstring (symmetric: (gap_i + gap'_i) / 2), with
    autograd, in the accumulation dtype; the loss is the plain loss + label_smoothing * gap."""
    acc = accumulate_dtype(query.dtype)
    q = query.to(acc)
    k = q if key is query else key.to(acc)
    bank = None if bank is None else bank.to(acc)
    per_query = None if per_query is None else per_query.to(acc)
    # A symmetric loss (M == N, no targets, in-batch keys only) always takes this branch.
    if bank is None and per_query is None and options.in_batch_negatives:
        gap = in_batch_gap(q, k, targets, normalize=options.normalize, eps=options.eps,
                           exclude_self=options.exclude_self, symmetric=options.symmetric)
        return gap * scale.to(gap.dtype)
    norms = [inverse_norms(t, options.normalize, options.eps) for t in (q, k, bank, per_query)]
    gap = _row_gap(options, q, k, norms, bank, per_query, targets, query_ids, bank_ids)
    return gap * scale.to(gap.dtype)
