"""Contrastive objectives built on the fused log-sum-exp (``_fused.FusedInfoNCE``).

The fused Function does every O(N M) part: the log-sum-exp over the candidates of each row, with
the positive masked out of the tiles by ids when it must not be a candidate. What remains is
O(N D) per row and is written here with plain PyTorch autograd:

  DCL  (Yeh et al. 2022)      loss_i = lse_{neg(i)} s - s_p(i)                 (FusedInfoNCE alone)
  DCLW                        loss_i = lse_{neg(i)} s - w_i s_p(i),
                              w_i = 2 - N softmax_i(<q^_i, k^_t(i)> / sigma)
  HCL  (Robinson et al. 2021) log Ng_i = log(n_i) + lse_{neg}((1+beta) s) - lse_{neg}(beta s)
                              Ng_i <- max((Ng_i - tau_plus n_i e^{s_p}) / (1 - tau_plus), n_i e^{-1/tau})
                              loss_i = log(e^{s_p} + Ng_i) - s_p   (decoupled: log Ng_i - s_p)
  SupCon L_out (Khosla et al. 2020)
                              loss_a = lse_{b != a} s_ab - (1/|P(a)|) sum_{p in P(a)} s_ap
     where sum_{p in P(a)} s_ap = <z^_a, S_{c(a)}> / tau - <z^_a, z^_a> / tau with S_c the sum of
     the normalised features of class c: positives by label equality need neither an N x N mask
     nor a pass over the tiles.

HCL costs two fused log-sum-exp passes (scales (1+beta)/tau and beta/tau; one when beta = 0).
"""
import math
from dataclasses import dataclass, replace
from typing import Optional

import torch
import torch.nn.functional as F

from ._fused import FusedInfoNCE
from .reference import reduce_loss


@dataclass(frozen=True)
class Objective:
    """The per-row objective on top of the candidates' log-sum-exp (validated by functional)."""

    decoupled: bool = False
    dclw_sigma: Optional[float] = None
    hcl_beta: float = 0.0
    hcl_tau_plus: float = 0.0

    @property
    def hard_negatives(self):
        return self.hcl_beta != 0 or self.hcl_tau_plus != 0

    @property
    def needs_host_terms(self):
        return self.dclw_sigma is not None or self.hard_negatives


def _accumulate(t):
    return t.double() if t.dtype == torch.float64 else t.float()


def positive_scores(query, key, targets, scale, normalize, eps):
    """s_p(i) = <q_i, k_t(i)> * scale (normalised first when ``normalize``), with autograd."""
    k = key if targets is None else key.index_select(0, targets)
    q, k = _accumulate(query), _accumulate(k)
    if normalize:
        q, k = F.normalize(q, dim=-1, eps=eps), F.normalize(k, dim=-1, eps=eps)
    return (q * k).sum(dim=-1) * scale.to(q.dtype)


def negative_counts(cfg, n, m, bank, per_query, mask_ids, device):
    """n_i: the number of negatives of each row (the candidates minus the positive)."""
    static = (m - 1 - int(cfg.exclude_self) if cfg.in_batch_negatives else 0)
    static += (0 if bank is None else bank.shape[0]) + (0 if per_query is None else per_query.shape[1])
    counts = torch.full((n,), float(static), device=device)
    if mask_ids is not None:  # bank entries of the query's own instance are not negatives
        query_ids, bank_ids = mask_ids
        sorted_ids = bank_ids.sort().values
        same = (torch.searchsorted(sorted_ids, query_ids, right=True)
                - torch.searchsorted(sorted_ids, query_ids))
        counts -= torch.where(query_ids >= 0, same, torch.zeros_like(same)).to(counts.dtype)
    return counts


def _fused_lse(ops, cfg, inputs, scale):
    """Per-row log-sum-exp over the negatives (positive masked), at score scale ``scale``."""
    query, key, bank, per_query, targets, mask_ids = inputs
    cfg = replace(cfg, reduction="none", exclude_positive=True, subtract_positive=False)
    return FusedInfoNCE.apply(ops, cfg, query, key, bank, per_query, scale, targets, mask_ids)


def info_nce_objective(ops, cfg, objective, query, key, bank, per_query, scale, targets,
                       mask_ids=None):
    """InfoNCE with the options of ``objective`` (DCL / DCLW / HCL), reduced as cfg.reduction."""
    if not objective.needs_host_terms:
        cfg = replace(cfg, exclude_positive=objective.decoupled)
        return FusedInfoNCE.apply(ops, cfg, query, key, bank, per_query, scale, targets, mask_ids)
    inputs = (query, key, bank, per_query, targets, mask_ids)
    positive = positive_scores(query, key, targets, scale, cfg.normalize, cfg.eps)
    if objective.dclw_sigma is not None:
        cosine = positive / scale.to(positive.dtype)
        weight = 2 - positive.shape[0] * torch.softmax(cosine / objective.dclw_sigma, dim=0)
        loss = _fused_lse(ops, cfg, inputs, scale).to(positive.dtype) - weight * positive
    else:
        loss = _hard_negative_loss(ops, cfg, objective, inputs, scale, positive)
    return reduce_loss(loss, cfg.reduction).to(query.dtype)


def _hard_negative_loss(ops, cfg, objective, inputs, scale, positive):
    query, key, bank, per_query, _, mask_ids = inputs
    beta, tau_plus = objective.hcl_beta, objective.hcl_tau_plus
    log_n = negative_counts(cfg, query.shape[0], key.shape[0], bank, per_query, mask_ids,
                            query.device).to(positive.dtype).log()
    lse_hard = _fused_lse(ops, cfg, inputs, scale * (1 + beta)).to(positive.dtype)
    lse_base = log_n if beta == 0 else _fused_lse(ops, cfg, inputs, scale * beta).to(positive.dtype)
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
    denominator = log_ng if objective.decoupled else torch.logaddexp(positive, log_ng)
    return denominator - positive


def supcon_objective(ops, cfg, features, labels, scale):
    """SupCon L_out over features (R, D) with labels (R,); per-anchor losses reduced as
    cfg.reduction (mean over anchors that have a positive); see the module docstring."""
    z = _accumulate(features)
    if cfg.normalize:
        z = F.normalize(z, dim=-1, eps=cfg.eps)
    _, cls = torch.unique(labels, return_inverse=True)
    n_cls = int(cls.max()) + 1
    class_sums = torch.zeros(n_cls, z.shape[1], dtype=z.dtype, device=z.device).index_add(0, cls, z)
    pos_count = torch.bincount(cls, minlength=n_cls)[cls] - 1
    pos_mean = ((z * class_sums[cls]).sum(dim=1) - (z * z).sum(dim=1)) * scale.to(z.dtype) \
        / pos_count.clamp_min(1)
    has_positive = pos_count > 0
    lse_cfg = replace(cfg, subtract_positive=False, exclude_self=True)
    if cfg.reduction == "none":
        lse = FusedInfoNCE.apply(ops, lse_cfg, features, features, None, None, scale, None, None)
        loss = torch.where(has_positive, lse.to(z.dtype) - pos_mean, torch.zeros_like(pos_mean))
        return loss.to(features.dtype)
    # A weighted sum keeps the fused kernels on their no-recompute path: w_a = 1 / #anchors with
    # a positive ("mean") or 1 ("sum") for those anchors, 0 for the others.
    weights = has_positive.to(z.dtype)
    if cfg.reduction == "mean":
        weights = weights / has_positive.sum().clamp_min(1)
    lse_cfg = replace(lse_cfg, reduction="sum")
    lse_sum = FusedInfoNCE.apply(ops, lse_cfg, features, features, None, None, scale, None, None,
                                 weights)
    return (lse_sum.to(z.dtype) - (weights * pos_mean).sum()).to(features.dtype)
