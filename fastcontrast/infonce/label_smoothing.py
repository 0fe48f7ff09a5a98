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
key i over the queries."""
import torch
import torch.nn.functional as F

from .._host import accumulate_dtype, class_index

__all__ = ["smoothing_gap", "gap_from_sums", "same_id_bank_sums"]


def _unit(t, normalize, eps):
    if t is None:
        return None
    t = t.to(accumulate_dtype(t.dtype))
    return F.normalize(t, dim=-1, eps=eps) if normalize else t


def same_id_bank_sums(query_ids, bank_ids, bank):
    """(sum, count) per query of the bank entries whose id equals the query's (>= 0)."""
    n = query_ids.shape[0]
    cls = class_index(torch.cat([query_ids, bank_ids]))
    sums = bank.new_zeros(cls.shape[0], bank.shape[1]).index_add(0, cls[n:], bank)
    counts = bank.new_zeros(cls.shape[0]).index_add(0, cls[n:], bank.new_ones(bank.shape[0]))
    matches = (query_ids >= 0).to(bank.dtype)
    return sums[cls[:n]] * matches.unsqueeze(1), counts[cls[:n]] * matches


def gap_from_sums(q, positive_key, candidate_sum, candidate_count):
    """gap_i / scale = <q^_i, k^_{t_i} - (candidate sum of row i) / |C(i)|>."""
    return (q * (positive_key - candidate_sum / candidate_count.unsqueeze(1))).sum(dim=-1)


def _row_gap(options, q, k, bank, per_query, targets, query_ids, bank_ids):
    """gap_i / scale of row i from this process's keys (gap_from_sums)."""
    n = q.shape[0]
    positive_key = k if targets is None else k.index_select(0, targets)
    if options.in_batch_negatives:
        total = k.sum(dim=0).expand(n, -1)
        count = q.new_full((n,), float(k.shape[0]))
        if options.exclude_self:  # exclude_self means M == N: key i leaves row i
            total = total - k
            count = count - 1
    else:
        total, count = positive_key, q.new_ones(n)
    if bank is not None:
        total = total + bank.sum(dim=0)
        count = count + bank.shape[0]
        if query_ids is not None:
            same_sum, same_count = same_id_bank_sums(query_ids, bank_ids, bank)
            total, count = total - same_sum, count - same_count
    if per_query is not None:
        total = total + per_query.sum(dim=1)
        count = count + per_query.shape[1]
    return gap_from_sums(q, positive_key, total, count)


def smoothing_gap(options, query, key, *, scale, bank=None, per_query=None, targets=None,
                  query_ids=None, bank_ids=None):
    """Per-row gap_i (N,) of the module docstring (symmetric: (gap_i + gap'_i) / 2), with
    autograd, in the accumulation dtype; the loss is the plain loss + label_smoothing * gap."""
    eps = options.eps
    q = _unit(query, options.normalize, eps)
    k = q if key is query else _unit(key, options.normalize, eps)
    bank, per_query = _unit(bank, options.normalize, eps), _unit(per_query, options.normalize, eps)
    gap = _row_gap(options, q, k, bank, per_query, targets, query_ids, bank_ids)
    if options.symmetric:  # M == N, targets None, in-batch keys only: key i's column over q
        gap = 0.5 * (gap + gap_from_sums(k, q, q.sum(dim=0), q.new_full((q.shape[0],),
                                                                         float(q.shape[0]))))
    return gap * scale.to(gap.dtype)
