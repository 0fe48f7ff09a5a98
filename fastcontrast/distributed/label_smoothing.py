"""Label smoothing over the keys of every rank (fastcontrast/infonce/label_smoothing.py, with
global sums): loss_i += eps gap_i,

    gap_i = s_{i,t_i} - mean_{j in C(i)} s_ij = scale <q^_i, k^_{t_i} - S_i / |C(i)|>,

S_i the sum of row i's candidates over all ranks: every rank's keys (all-reduced with
autograd), minus key i under exclude_self, plus every rank's bank minus the entries with the
query's id (gathered with autograd only when ids are given), plus row i's per-query negatives.
A symmetric loss (CLIP) adds key i's column term over the queries of every rank."""

from .._host import accumulate_dtype
from ..infonce.label_smoothing import gap_from_sums, same_id_bank_sums
from .collectives import AllGatherWithGrad, AllReduceWithGrad, all_gather_rows

__all__ = ["global_smoothing_gap"]


def global_smoothing_gap(comm, options, q, k, bank, per_query, scale, *, targets, n_rows, n_keys,
                         bank_sizes, query_ids=None, bank_ids=None):
    """gap_i (N_r,) of this rank's rows (symmetric: (gap_i + gap'_i) / 2), with autograd, in
    the accumulation dtype. q, k, bank, per_query: this rank's prepared (normalised) operands;
    ``targets``: the global index of each row's positive key, or None (key i)."""
    acc = accumulate_dtype(q.dtype)
    q, k = q.to(acc), k.to(acc)
    n = q.shape[0]
    if targets is None:
        positive_key = k
    else:
        positive_key = AllGatherWithGrad.apply(k, comm, tuple(n_keys))[targets]
    if options.in_batch_negatives:
        total = AllReduceWithGrad.apply(k.sum(dim=0), comm).expand(n, -1)
        count = q.new_full((n,), float(sum(n_keys)))
        if options.exclude_self:  # query and key are one set: global key i is this row's own
            total, count = total - k, count - 1
    else:
        total, count = positive_key, q.new_ones(n)
    if bank is not None:
        bank = bank.to(acc)
        total = total + AllReduceWithGrad.apply(bank.sum(dim=0), comm)
        count = count + sum(bank_sizes)
        if query_ids is not None:
            all_bank = AllGatherWithGrad.apply(bank, comm, tuple(bank_sizes))
            all_ids = all_gather_rows(comm, bank_ids.contiguous(), bank_sizes)
            same_sum, same_count = same_id_bank_sums(query_ids, all_ids, all_bank)
            total, count = total - same_sum, count - same_count
    if per_query is not None:
        total = total + per_query.to(acc).sum(dim=1)
        count = count + per_query.shape[1]
    gap = gap_from_sums(q, positive_key, total, count)
    if options.symmetric:  # key i's column over the queries of every rank
        n_total = sum(n_rows)
        column = gap_from_sums(k, q, AllReduceWithGrad.apply(q.sum(dim=0), comm),
                               q.new_full((n,), float(n_total)))
        gap = 0.5 * (gap + column)
    return gap * scale.to(acc)
