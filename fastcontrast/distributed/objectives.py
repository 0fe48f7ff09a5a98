"""The per-row InfoNCE objectives of fastcontrast.distributed.info_nce over the candidates of
every rank (the formulas are fastcontrast.infonce's, on the concatenated batch):

    plain  loss_i = lse_{C(i)} s - s_p(i)   (symmetric: (row_lse_i + col_lse_i) / 2 - s_ii)
    DCL    loss_i = lse_{neg(i)} s - s_p(i)            (the positive masked by ids)
    DCLW   loss_i = lse_{neg(i)} s - w_i s_p(i),  w_i = 2 - N_total softmax_i(cos_i / sigma),
           the softmax over the rows of ALL ranks: its normaliser is a log-sum-exp all-reduced
           with autograd (O(1) floats), so each rank's rows get the gradient of every rank's
           losses through it
    HCL    infonce's hard-negative loss with n_i the negatives of row i over all ranks, and the
           log-sum-exps of the negatives at scales (1 + beta) / tau and beta / tau (two passes,
           one when beta = 0); s_p from the first pass (its positive output / (1 + beta))

``Candidates`` wraps one rank's part of the product (DistributedLSE over [key; bank] of every
rank, masks included), the bank as a second product where the mask needs two ids per row
(in-batch keys masking the positives, query ids masking the bank), and the candidates outside
them (the positive without in-batch negatives, per-query negatives); ``row_losses`` returns
the per-row losses (zero where ``valid`` is False: rows that kept no negative).
"""
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..infonce.objectives import InfoNCEOptions, hard_negative_loss
from .collectives import AllReduceWithGrad, Comm
from .ops import DistributedLSE, Layout, LSESpec

__all__ = ["Candidates", "row_losses", "global_logsumexp", "negative_counts"]


@dataclass
class Candidates:
    """This rank's operands (normalised when the loss normalises): rows q, the product keys y
    (None: no product) with every rank's sizes in ``layout``, the product index of the
    positives (None: the positive is not a column), the mask ids (row_ids, col_ids) or None,
    per-query negatives (N, K, D) or None, and ``positive_outside``: s_p(i) at ``base_scale``
    when it is computed apart (no in-batch negatives), else None."""

    comm: Comm
    spec: LSESpec
    q: torch.Tensor
    y: Optional[torch.Tensor]
    layout: Layout
    product_targets: Optional[torch.Tensor]
    ids: Optional[tuple]
    per_query: Optional[torch.Tensor]
    positive_outside: Optional[torch.Tensor]
    base_scale: torch.Tensor
    bank_apart: Optional[tuple] = None  # (this rank's bank, Layout, (query_ids, bank_ids))
    row_filter: Optional[object] = None  # false_negatives.RowFilter of the product, or None

    def lse(self, scale, with_positive):
        """(row lse over the candidates at ``scale``, the column lse or None, s_p at ``scale``
        or None). ``with_positive``: the positive outside the product is a candidate."""
        row_lse = col_lse = positive = None
        if self.y is not None and sum(self.layout.keys) > 0:
            row_ids, col_ids = self.ids if self.ids is not None else (None, None)
            row_lse, col_lse, positive = DistributedLSE.apply(
                self.q, scale, self.y, self.product_targets, row_ids, col_ids, self.comm,
                self.layout, self.spec, self.row_filter)
            if self.product_targets is None:
                positive = None
        if positive is None and self.positive_outside is not None:
            positive = self.positive_outside * (scale / self.base_scale).to(
                self.positive_outside.dtype)
        dtype = positive.dtype if positive is not None else scale.dtype
        parts = []
        if with_positive and self.positive_outside is not None:
            parts.append(positive.unsqueeze(1))
        if self.per_query is not None:
            scores = torch.einsum("nd,nkd->nk", self.q, self.per_query).to(dtype) * scale
            parts.append(scores)
        if row_lse is not None:
            parts.append(row_lse.to(dtype).unsqueeze(1))
        if self.bank_apart is not None and sum(self.bank_apart[1].keys) > 0:
            bank, layout, (row_ids, col_ids) = self.bank_apart
            spec = replace(self.spec, exclude_self=False, with_col=False)
            bank_lse = DistributedLSE.apply(self.q, scale, bank, None, row_ids, col_ids,
                                            self.comm, layout, spec)[0]
            parts.append(bank_lse.to(dtype).unsqueeze(1))
        lse = torch.logsumexp(torch.cat(parts, dim=1), dim=1) if len(parts) > 1 else \
            parts[0][:, 0]
        return lse, col_lse, positive


def global_logsumexp(comm, values):
    """log sum_{i over every rank's rows} exp(values_i), differentiable: the gradient reaches
    every rank's values (an all-reduce with grad of sum exp(values - max), max all-reduced)."""
    import torch.distributed as dist

    top = values.detach().max() if values.numel() else values.new_tensor(float("-inf"))
    top = top.reshape(1).clone()
    if comm.world > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=comm.group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = AllReduceWithGrad.apply(torch.exp(values - top).sum().reshape(1), comm)
    return (torch.log(total) + top)[0]


def _zero_outside(t, valid):
    return t if valid is None else torch.where(valid, t, torch.zeros_like(t))


def row_losses(options: InfoNCEOptions, cand: Candidates, scale, n_total, log_n, valid):
    """Per-row losses (N_r,) of the objective of ``options`` (see the module docstring).
    ``log_n``: log of every row's negatives over all ranks (HCL), ``valid``: rows with a
    negative (None: all)."""
    if not options.needs_host_terms:
        lse, col_lse, positive = cand.lse(scale, with_positive=not options.decoupled)
        if options.symmetric:
            return 0.5 * (lse + col_lse.to(lse.dtype)) - positive
        return _zero_outside(lse - positive, valid)
    if options.dclw_sigma is not None:
        lse, _, positive = cand.lse(scale, with_positive=False)
        lse = _zero_outside(lse, valid)
        cosine = positive / scale.to(positive.dtype)
        logits = cosine / options.dclw_sigma
        weight = 2 - n_total * torch.exp(logits - global_logsumexp(cand.comm, logits))
        return _zero_outside(lse - weight * positive, valid)
    beta = options.hcl_beta
    hard_lse, _, hard_positive = cand.lse(scale * (1 + beta), with_positive=False)
    positive = hard_positive / (1 + beta)
    calls = []

    def negatives_lse(at_scale):
        # hard_negative_loss asks for the (1 + beta) / tau pass first: it is already done
        calls.append(at_scale)
        lse = hard_lse if len(calls) == 1 else cand.lse(at_scale, with_positive=False)[0]
        return _zero_outside(lse.to(positive.dtype), valid)

    loss = hard_negative_loss(options, negatives_lse, scale, positive,
                               _zero_outside(log_n.to(positive.dtype), valid))
    return _zero_outside(loss, valid)


def negative_counts(static, n, query_ids, all_bank_ids, device, dtype):
    """n_i (N_r,): ``static`` negatives per row minus the bank entries of every rank whose id is
    the query's (>= 0; ``all_bank_ids``: every rank's bank ids in rank order)."""
    counts = torch.full((n,), float(static), device=device, dtype=dtype)
    if query_ids is None:
        return counts
    sorted_ids = all_bank_ids.sort().values
    same = (torch.searchsorted(sorted_ids, query_ids, right=True)
            - torch.searchsorted(sorted_ids, query_ids))
    return counts - torch.where(query_ids >= 0, same, torch.zeros_like(same)).to(dtype)
