"""InfoNCE with multiple positives across two sets (UniCL; CLIP with repeated captions): the
positives of query i are every key with its label,

    loss_i = lse_{j in C(i)} s_ij - mean_{p in P(i)} s_ip,
    P(i) = {p in C(i): key_label_p = query_label_i}

SupCon's L_out between two sets. Rows without a positive give 0 and are left out of the mean.
The log-sum-exp is one fused pass over the candidates (positive-free: subtract_positive=False);
the positive means come from class sums,

    sum_{p in P(i)} s_ip = scale <q^_i, S_{c(i)}> (minus key i itself under exclude_self),
    S_c = sum of the normalised keys of class c,

so no N x M mask is formed (O((N + M) D) beyond the fused pass, plain autograd). Symmetric:
loss_i = (row_i + col_i) / 2, col_i the same loss of key i over the queries, each direction a
mean over its own rows that have a positive; both log-sum-exps come from ONE symmetric fused
pass (row and column weights, FusedInputs.col_weights), as plain CLIP's do."""
from dataclasses import replace

import torch
import torch.nn.functional as F

from .._host import accumulate_dtype, class_index, non_negative_value
from .function import fused_loss, upcast_inputs
from .fused_pass import FusedPass

__all__ = ["multi_positive_loss"]


def _positive_means(options, query, key, query_labels, key_labels, scale):
    """(mean_{p in P(i)} s_ip (N,), |P(i)| (N,)) from class sums of the keys, with autograd."""
    n = query.shape[0]
    acc = accumulate_dtype(query.dtype)
    q, k = query.to(acc), key.to(acc)
    if options.normalize:
        q = F.normalize(q, dim=-1, eps=options.eps)
        k = q if key is query else F.normalize(k, dim=-1, eps=options.eps)
    cls = class_index(torch.cat([query_labels, key_labels]))
    query_cls, key_cls = cls[:n], cls[n:]
    sums = k.new_zeros(cls.shape[0], k.shape[1]).index_add(0, key_cls, k)
    counts = k.new_zeros(cls.shape[0]).index_add(0, key_cls, k.new_ones(k.shape[0]))
    positive_sum, count = sums[query_cls], counts[query_cls]
    if options.exclude_self:  # key i (M == N) is no candidate of row i, so no positive either
        own = (query_labels == key_labels).to(acc)
        positive_sum = positive_sum - own.unsqueeze(1) * k
        count = count - own
    dots = (q * positive_sum).sum(dim=-1) * scale.to(acc)
    return dots / count.clamp_min(1), count


def _direction_weights(count, reduction, dtype):
    """Each row's weight in its direction's reduction: 0 without a positive, else 1 ("sum",
    "none") or 1 / (rows with a positive) ("mean")."""
    weights = (count > 0).to(dtype)
    return weights / weights.sum().clamp_min(1) if reduction == "mean" else weights


def _one_direction(options, fused_pass, query, key, query_labels, key_labels, operands):
    """Per-row losses (reduction "none") or their reduction, rows without a positive left out."""
    pos_mean, count = _positive_means(options, query, key, query_labels, key_labels,
                                      operands["scale"])
    has_positive = count > 0
    if options.reduction == "none":
        lse = fused_loss(replace(fused_pass, reduction="none"), query, key, **operands)
        loss = torch.where(has_positive, lse.to(pos_mean.dtype) - pos_mean,
                           torch.zeros_like(pos_mean))
        return non_negative_value(loss)
    # A weighted sum keeps the fused kernels on their no-recompute path (as SupCon does).
    weights = _direction_weights(count, options.reduction, pos_mean.dtype)
    lse_sum = fused_loss(replace(fused_pass, reduction="sum"), query, key, row_weights=weights,
                         **operands)
    return lse_sum.to(pos_mean.dtype) - (weights * pos_mean).sum()


def _symmetric(options, fused_pass, query, key, query_labels, key_labels, operands):
    """(row_i + col_i) / 2 reduced, rows and columns without a positive left out of their
    direction's mean; one symmetric fused pass."""
    scale = operands["scale"]
    row_mean, row_count = _positive_means(options, query, key, query_labels, key_labels, scale)
    col_mean, col_count = _positive_means(options, key, query, key_labels, query_labels, scale)
    row_w = _direction_weights(row_count, options.reduction, row_mean.dtype)
    col_w = _direction_weights(col_count, options.reduction, col_mean.dtype)
    both = replace(fused_pass, symmetric=True, reduction="none" if options.reduction == "none"
                   else "sum")
    lse = fused_loss(both, query, key, row_weights=row_w, col_weights=col_w, **operands)
    positives = 0.5 * (row_w * row_mean + col_w * col_mean)
    if options.reduction != "none":
        return lse.to(positives.dtype) - positives.sum()
    loss = lse.to(positives.dtype) - positives
    return non_negative_value(loss)


def multi_positive_loss(options, query, key, *, scale, query_labels, key_labels, bank=None,
                        per_query=None, query_ids=None, bank_ids=None):
    """The loss of the module docstring, reduced as options.reduction, in the accumulation
    dtype; bank / per_query negatives and ids are extra candidates (never positives)."""
    fused_pass = FusedPass(
        backend=options.backend, in_batch_negatives=True, exclude_self=options.exclude_self,
        symmetric=False, normalize=options.normalize, reduction=options.reduction,
        exclude_positive=False, subtract_positive=False, eps=options.eps)
    # One float32 copy of low-precision inputs feeds the fused pass and the class sums.
    fused_pass, (query, key, bank, per_query) = upcast_inputs(fused_pass, query, key, bank,
                                                              per_query)
    operands = dict(scale=scale, bank=bank, per_query=per_query, query_ids=query_ids,
                    bank_ids=bank_ids)
    if not options.symmetric:
        return _one_direction(options, fused_pass, query, key, query_labels, key_labels,
                              operands)
    return _symmetric(options, fused_pass, query, key, query_labels, key_labels, operands)

