"""The InfoNCE objectives on top of the fused log-sum-exp (function.fused_loss), with their
options: plain InfoNCE (one fused pass), and the objectives with host terms (O(N D) per row,
plain autograd):

    DCL  (Yeh et al. 2022)      loss_i = lse_{neg(i)} s - s_p(i)             (one fused pass)
    DCLW                        loss_i = lse_{neg(i)} s - w_i s_p(i),
                                w_i = 2 - N softmax_i(<q^_i, k^_t(i)> / sigma)
    HCL  (Robinson et al. 2021) log Ng_i = log(n_i) + lse_neg((1+beta) s) - lse_neg(beta s)
                                Ng_i <- max((Ng_i - tau_plus n_i e^{s_p}) / (1 - tau_plus),
                                            n_i e^{-1/tau})
                                loss_i = log(e^{s_p} + Ng_i) - s_p   (decoupled: log Ng_i - s_p)

HCL costs two fused log-sum-exp passes (scales (1+beta)/tau and beta/tau; one when beta = 0).
n_i counts the negatives of row i (the candidates minus the positive)."""
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from .._host import accumulate_dtype, reduce_loss
from .function import fused_loss, upcast_inputs
from .fused_pass import FusedPass
from .false_negatives import filtered_loss
from .label_smoothing import smoothing_gap
from .multi_positive import multi_positive_loss

__all__ = ["InfoNCEOptions", "info_nce_loss", "differentiable_positive_scores",
           "static_negative_count", "negative_counts", "hard_negative_loss"]


@dataclass(frozen=True)
class InfoNCEOptions:
    """The static options of one info_nce call, built once by fastcontrast.functional from the
    validated arguments (``backend`` is the resolved name)."""

    backend: str
    in_batch_negatives: bool = True
    exclude_self: bool = False
    symmetric: bool = False
    normalize: bool = True
    reduction: str = "mean"
    decoupled: bool = False
    dclw_sigma: Optional[float] = None
    hcl_beta: float = 0.0
    hcl_tau_plus: float = 0.0
    eps: float = 1e-12  # as torch.nn.functional.normalize
    involutive_targets: bool = False  # t[t[i]] == i (NT-Xent): the positive mask is symmetric
    label_smoothing: float = 0.0  # (label_smoothing.py; not with DCL / DCLW / HCL)
    matryoshka_dims: tuple = ()  # (matryoshka.py; () for none) and their weights
    matryoshka_weights: tuple = ()

    @property
    def hard_negatives(self):
        return self.hcl_beta != 0 or self.hcl_tau_plus != 0

    @property
    def needs_host_terms(self):
        """DCLW / HCL: the loss is more than one fused log-sum-exp minus the positive."""
        return self.dclw_sigma is not None or self.hard_negatives


def _loss_pass(options):
    """The pass of a plain InfoNCE / DCL loss: lse over the candidates minus the positive."""
    return FusedPass(backend=options.backend, in_batch_negatives=options.in_batch_negatives,
                     exclude_self=options.exclude_self, symmetric=options.symmetric,
                     normalize=options.normalize, reduction=options.reduction,
                     exclude_positive=options.decoupled, subtract_positive=True,
                     eps=options.eps, involutive_targets=options.involutive_targets)


def _negatives_pass(options):
    """The per-row log-sum-exp over the negatives alone (positive masked): DCLW and HCL."""
    return replace(_loss_pass(options), reduction="none", exclude_positive=True,
                   subtract_positive=False)


def differentiable_positive_scores(query, key, targets, scale, normalize, eps):
    """s_p(i) = <q_i, k_t(i)> * scale (normalised first when ``normalize``), with autograd."""
    k = key if targets is None else key.index_select(0, targets)
    q, k = [t.double() if t.dtype == torch.float64 else t.float() for t in (query, k)]
    if normalize:
        q, k = F.normalize(q, dim=-1, eps=eps), F.normalize(k, dim=-1, eps=eps)
    return (q * k).sum(dim=-1) * scale.to(q.dtype)


def static_negative_count(options, m, bank, per_query):
    """The number of negatives of every row before id masks (the candidates minus the
    positive)."""
    static = (m - 1 - int(options.exclude_self) if options.in_batch_negatives else 0)
    return static + (0 if bank is None else bank.shape[0]) + (
        0 if per_query is None else per_query.shape[1])


def negative_counts(options, n, m, bank, per_query, query_ids, bank_ids, device):
    """n_i: the number of negatives of each row (the candidates minus the positive)."""
    static = static_negative_count(options, m, bank, per_query)
    counts = torch.full((n,), float(static), device=device)
    if query_ids is not None:  # bank entries of the query's own instance are not negatives
        sorted_ids = bank_ids.sort().values
        same = (torch.searchsorted(sorted_ids, query_ids, right=True)
                - torch.searchsorted(sorted_ids, query_ids))
        counts -= torch.where(query_ids >= 0, same, torch.zeros_like(same)).to(counts.dtype)
    return counts


def info_nce_loss(options, query, key, *, scale, bank=None, per_query=None, targets=None,
                  query_ids=None, bank_ids=None, query_labels=None, key_labels=None,
                  false_negatives=None, return_dropped=False):
    """InfoNCE with the objective of ``options`` (plain, label-smoothed, multi-positive, DCL,
    DCLW, HCL), reduced as options.reduction, in the accumulation dtype (float32 for half
    inputs: the public function casts it). bank (K, D) / per_query (N, K, D) negatives;
    scale = 1/temperature. query_labels (N,) / key_labels (M,): multiple positives
    (multi_positive.py). ``false_negatives``: a false_negatives.FalseNegatives filter (plain
    InfoNCE only), ``return_dropped``: (loss, dropped counts) (false_negatives.filtered_loss)."""
    if false_negatives is not None:
        return filtered_loss(_loss_pass(options), false_negatives, query, key, scale=scale,
                             bank=bank, targets=targets, query_ids=query_ids, bank_ids=bank_ids,
                             return_dropped=return_dropped)
    if query_labels is not None:
        return multi_positive_loss(options, query, key, scale=scale, query_labels=query_labels,
                                   key_labels=key_labels, bank=bank, per_query=per_query,
                                   query_ids=query_ids, bank_ids=bank_ids)
    valid = None  # rows that keep a negative (None: every row does)
    over_negatives = options.decoupled or options.needs_host_terms
    if over_negatives and static_negative_count(options, key.shape[0], bank, per_query) == 0:
        return _no_candidate_loss(options, query, key, targets, scale)
    if over_negatives and query_ids is not None:
        valid = negative_counts(options, query.shape[0], key.shape[0], bank, per_query,
                                query_ids, bank_ids, query.device) > 0
    if options.label_smoothing:
        return _smoothed_loss(options, query, key, scale=scale, bank=bank, per_query=per_query,
                              targets=targets, query_ids=query_ids, bank_ids=bank_ids)
    if not options.needs_host_terms:
        fused_pass, weights = _over_rows(_loss_pass(options), valid,
                                         accumulate_dtype(query.dtype))
        return fused_loss(fused_pass, query, key, scale=scale, bank=bank, per_query=per_query,
                          targets=targets, query_ids=query_ids, bank_ids=bank_ids,
                          row_weights=weights)
    negatives, (query, key, bank, per_query) = upcast_inputs(_negatives_pass(options), query,
                                                             key, bank, per_query)

    def negatives_lse(at_scale):
        lse = _negatives_lse(negatives, query, key, scale=at_scale, bank=bank,
                             per_query=per_query, targets=targets, query_ids=query_ids,
                             bank_ids=bank_ids).to(positive.dtype)
        return _zero_outside(lse, valid)

    positive = differentiable_positive_scores(query, key, targets, scale, options.normalize,
                                              options.eps)
    if options.dclw_sigma is not None:
        cosine = positive / scale.to(positive.dtype)
        weight = 2 - positive.shape[0] * torch.softmax(cosine / options.dclw_sigma, dim=0)
        loss = negatives_lse(scale) - weight * positive
    else:
        log_n = negative_counts(options, query.shape[0], key.shape[0], bank, per_query,
                                query_ids, bank_ids, query.device).to(positive.dtype).log()
        loss = hard_negative_loss(options, negatives_lse, scale, positive,
                                  _zero_outside(log_n, valid))
    return reduce_loss(_zero_outside(loss, valid), options.reduction, valid)


def _smoothed_loss(options, query, key, **operands):
    """The label-smoothed loss: the plain fused loss + label_smoothing * gap (label_smoothing.py),
    both over one float32 copy of low-precision inputs (upcast_inputs)."""
    names = ("bank", "per_query")
    fused_pass, (query, key, *negatives) = upcast_inputs(
        _loss_pass(options), query, key, *(operands[name] for name in names))
    operands.update(zip(names, negatives))
    plain = fused_loss(fused_pass, query, key, **operands)
    gap = smoothing_gap(options, query, key, **operands)
    return plain + options.label_smoothing * reduce_loss(gap, options.reduction).to(plain.dtype)


def _negatives_lse(fused_pass, query, key, *, scale, bank, per_query, targets, query_ids,
                   bank_ids):
    """Per-row log-sum-exp over the negatives (fused_pass: _negatives_pass), (N,). The kernels' id
    mask holds one id per row: with in-batch keys it masks each row's positive (row id t_i), so
    the bank entries of the query's own id (query_ids) go through a second product over the
    bank alone (row id query_ids_i), merged in log space: the same candidates as
    info_nce_reference and as the count of negative_counts."""
    if query_ids is None or bank is None or not fused_pass.in_batch_negatives:
        return fused_loss(fused_pass, query, key, scale=scale, bank=bank, per_query=per_query,
                          targets=targets, query_ids=query_ids, bank_ids=bank_ids)
    over_bank = fused_loss(replace(fused_pass, in_batch_negatives=False), query, key,
                           scale=scale, bank=bank, targets=targets, query_ids=query_ids,
                           bank_ids=bank_ids)
    if key.shape[0] - 1 - int(fused_pass.exclude_self) == 0:  # no in-batch negative
        return over_bank
    over_keys = fused_loss(fused_pass, query, key, scale=scale, per_query=per_query,
                           targets=targets)
    return torch.logaddexp(over_keys, over_bank.to(over_keys.dtype))


def _no_candidate_loss(options, query, key, targets, scale):
    """A DCL / HCL loss whose rows have no negative at all (e.g. N = 1): every row gives 0, none
    counts in the mean (so "mean" is 0 as well), and the gradient is 0, kept in the graph."""
    positive = differentiable_positive_scores(query, key, targets, scale, options.normalize,
                                              options.eps)
    loss = torch.where(torch.zeros_like(positive, dtype=torch.bool), positive,
                       torch.zeros_like(positive))
    return reduce_loss(loss, options.reduction)


def _zero_outside(t, valid):
    """t where ``valid`` (rows with a negative), 0 elsewhere (None: every row is valid). Applied
    to every per-row term, so that the -inf of an empty row never reaches a gradient."""
    return t if valid is None else torch.where(valid, t, torch.zeros_like(t))


def _over_rows(fused_pass, valid, dtype):
    """(fused_pass, row weights) of a fused pass whose loss counts only the ``valid`` rows: a row
    without any candidate gives 0 and is left out of the mean (weights 1 / #valid for "mean",
    1 for "sum" and "none", 0 for the empty rows); (fused_pass, None) when every row is valid."""
    if valid is None:
        return fused_pass, None
    weights = valid.to(dtype)
    if fused_pass.reduction == "mean":
        weights = weights / valid.sum().clamp_min(1)
        fused_pass = replace(fused_pass, reduction="sum")
    return fused_pass, weights


def hard_negative_loss(options, negatives_lse, scale, positive, log_n):
    beta, tau_plus = options.hcl_beta, options.hcl_tau_plus
    lse_hard = negatives_lse(scale * (1 + beta))
    lse_base = log_n if beta == 0 else negatives_lse(scale * beta)
    log_reweighted = log_n + lse_hard - lse_base
    # Debiasing in log space: Ng = rw (1 - tau_plus n e^{s_p} / rw) / (1 - tau_plus), then the
    # paper's floor n e^{-1/tau}; the inner factor is clamped before the log (no NaN gradient).
    log_ng = log_reweighted
    if tau_plus > 0:
        # inner = 1 - tau_plus n e^{s_p} / rw <= 0 once the exponent passes log(1 / tau_plus):
        # clamp the exponent there so that exp never overflows into an inf * 0 gradient.
        exponent = (positive + log_n - log_reweighted).clamp_max(-math.log(tau_plus))
        inner = 1 - tau_plus * torch.exp(exponent)
        tiny = torch.finfo(positive.dtype).tiny
        log_ng = log_ng + inner.clamp_min(tiny).log() - math.log1p(-tau_plus)
    log_ng = torch.maximum(log_ng, log_n - scale.to(positive.dtype))
    denominator = log_ng if options.decoupled else torch.logaddexp(positive, log_ng)
    return denominator - positive
