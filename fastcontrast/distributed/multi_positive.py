"""Multiple positives across two sets over the keys of every rank (fastcontrast/infonce/
multi_positive.py on the concatenated batch): the positives of query i are ALL keys of every
rank with its label,

    loss_i = lse_{j in C(i)} s_ij - mean_{p in P(i)} s_ip,
    P(i) = {p in C(i) over every rank: key_label_p = query_label_i},

rows without a positive give 0 and are left out of the mean (counted over all ranks, as
distributed supcon counts its anchors). The log-sum-exp is the candidates' pass of
objectives.Candidates (DistributedLSE over [key; bank] of every rank, no positive column); the
positive means come from class sums all-reduced with autograd,

    sum_{p in P(i)} s_ip = scale <q^_i, S_{c(i)}> (minus key i itself under exclude_self),
    S_c = sum over every rank of the normalised keys of class c,

so no N x M mask is formed: beyond the fused pass, one all_gather of the key labels
(O(M_total) int64) and one all-reduce of (C, D) floats (C the distinct key labels). Symmetric
(CLIP with repeated captions): (row_i + col_i) / 2, col_i the same loss of key i over the
queries of every rank (the column log-sum-exp of the same pass), each direction's mean over its
own rows of all ranks that have a positive."""
import torch

from .._host import accumulate_dtype, non_negative_value
from .calls import group_reduce
from .collectives import AllReduceWithGrad, all_gather_rows

__all__ = ["global_multi_positive"]


def _positive_means(comm, q, k, query_labels, key_labels, key_sizes, scale, exclude_self):
    """(mean_{p in P(i)} s_ip (N_r,), |P(i)| (N_r,)) of this rank's rows q against the keys of
    every rank (this rank's k, every rank's sizes ``key_sizes``), with autograd."""
    acc = accumulate_dtype(q.dtype)
    q, k = q.to(acc), k.to(acc)
    all_key_labels = all_gather_rows(comm, key_labels.contiguous(), list(key_sizes))
    classes = torch.unique(all_key_labels)  # sorted; the same on every rank
    n_classes = classes.shape[0]
    local_sums = k.new_zeros(n_classes, k.shape[1]).index_add(
        0, torch.searchsorted(classes, key_labels), k)
    sums = AllReduceWithGrad.apply(local_sums, comm)
    counts = torch.bincount(torch.searchsorted(classes, all_key_labels),
                            minlength=n_classes).to(acc)
    where = torch.searchsorted(classes, query_labels).clamp_max(n_classes - 1)
    found = classes[where] == query_labels  # a query label no key of any rank has: no positive
    positive_sum = sums[where] * found.to(acc).unsqueeze(1)
    count = torch.where(found, counts[where], torch.zeros_like(counts[where]))
    if exclude_self:  # global key i (this rank's key i) is no candidate of row i
        own = (query_labels == key_labels).to(acc)
        positive_sum = positive_sum - own.unsqueeze(1) * k
        count = count - own
    dots = (q * positive_sum).sum(dim=-1) * scale.to(acc)
    return dots / count.clamp_min(1), count


def _one_direction(comm, lse, q, k, query_labels, key_labels, key_sizes, scale, exclude_self,
                   reduction):
    """This rank's per-row losses (reduction "none") or its share of the group's reduction."""
    pos_mean, count = _positive_means(comm, q, k, query_labels, key_labels, key_sizes, scale,
                                      exclude_self)
    has_positive = count > 0
    loss = torch.where(has_positive, lse.to(pos_mean.dtype) - pos_mean,
                       torch.zeros_like(pos_mean))
    if reduction == "none":
        return non_negative_value(loss)  # as single-process
    counted = sum(r[0] for r in comm.exchange([int(has_positive.sum())], q.device))
    return group_reduce(comm, loss, reduction, counted)


def global_multi_positive(comm, options, cand, q, k, labels, scale, n_rows, n_keys):
    """The loss of the module docstring for info_nce / clip_loss after global_info_nce's
    exchange: ``cand`` the candidates (objectives.Candidates, no positive column), q / k this
    rank's prepared rows and keys, ``labels`` (query_labels, key_labels) of this rank, n_rows /
    n_keys every rank's sizes. Reduced by the group convention (fastcontrast.distributed.api)."""
    query_labels, key_labels = labels
    lse, col_lse, _ = cand.lse(scale, with_positive=True)
    rows = _one_direction(comm, lse, q, k, query_labels, key_labels, n_keys, scale,
                          options.exclude_self, options.reduction)
    if not options.symmetric:
        return rows
    columns = _one_direction(comm, col_lse, k, q, key_labels, query_labels, n_rows, scale,
                             False, options.reduction)
    return 0.5 * (rows + columns)
