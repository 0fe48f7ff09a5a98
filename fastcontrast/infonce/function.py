"""FusedInfoNCE: one autograd.Function for the whole InfoNCE family, O(N + M) memory beyond the
inputs, and ``fused_loss``, the call the objectives make.

The host part, once for every backend: L2 normalisation (folded into alpha / beta, or
normalised copies: operands.prepare), the positive score, the candidates that are not a tile of
the product (the positive when ``in_batch_negatives`` is False, per-query negatives (N, K, D)),
merging their log-sum-exp with the kernel's, the loss and all gradients (gradients.py):

    loss_i = lse_i - s_{i,t_i}   (symmetric: (row_lse_i + col_lse_i) / 2 - s_ii)

A backend that fuses the gradient (masked_lse_forward_with_grad) returns it for grad_output = 1
with the loss, and the backward scales it; otherwise the backward recomputes the tiles."""
from dataclasses import replace
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._host import (cast_gradients, first_order_only, or_empty, reduce_loss,
                     reduction_weights, requires_grad, scaled_fused_gradients)
from .._host_threads import serial_host_ops
from .gradients import InputGradients, Needs, gram_input_gradients, input_gradients
from .operands import candidate_count, extra_scores, positive_scores, prepare, product_of
from .ops import gram_lse_forward, masked_lse_forward, masked_lse_forward_with_grad

__all__ = ["FusedInfoNCE", "FusedInputs", "fused_loss", "non_negative", "upcast_inputs"]


class FusedInputs(NamedTuple):
    """The tensor inputs of FusedInfoNCE, in its argument order: query (N, D), key (M, D) or
    None (the keys are the queries), bank (K, D), per_query (N, K, D), scale = 1/temperature
    (0-dim), targets (N,), query_ids (N,) / bank_ids (K,) (a bank entry with the query's id is
    not a candidate), row_weights (N,) (the loss is sum_i w_i loss_i, reduced as the pass says),
    col_weights (N,) (a symmetric pass only: the column terms' own weights,
    loss_i = (w_i (row_lse_i - s_ii) + c_i (col_lse_i - s_ii)) / 2; None: c = w)."""

    query: Tensor
    key: Optional[Tensor]
    bank: Optional[Tensor]
    per_query: Optional[Tensor]
    scale: Tensor
    targets: Optional[Tensor]
    query_ids: Optional[Tensor]
    bank_ids: Optional[Tensor]
    row_weights: Optional[Tensor]
    col_weights: Optional[Tensor] = None

    def uses_gram(self, fused_pass):
        return fused_pass.uses_gram(self.key is None, self.bank, self.per_query, self.targets)


def _logaddexp(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return torch.logaddexp(a, b)


def _present(t):
    """None for the 0-element placeholder of an absent op output."""
    return None if t.numel() == 0 and t.dim() == 1 else t


def non_negative(loss, single_candidate):
    """The loss value where the positive is a candidate (the gradient is the kernels'): the
    positive's score inside the log-sum-exp and the subtracted one are computed apart, so
    round-off can leave loss_i a few ulp below 0; it is clamped there. A row whose only
    candidate is the positive is s - s: exactly 0 (NaN for a non-finite score, as in the
    cross-entropy form). NaN propagates either way."""
    return loss * 0 if single_candidate else loss.clamp_min(0)


def _filter_of(false_negatives, operands, fused_pass, positive, targets):
    """The kernel ops' filter keywords (false_negatives.py; none without a filter)."""
    if false_negatives is None:
        return {}
    return false_negatives.kernel_filter(operands, fused_pass, positive, targets).keywords()


def _weighted(loss, weights):
    """w_i loss_i, 0 where w_i == 0 (such a row may have no candidate: lse = -inf)."""
    w = weights.to(loss.dtype)
    return torch.where(w != 0, loss * w, torch.zeros_like(loss))


def _weighted_symmetric(row_lse, col_lse, positive, inputs):
    """(w_i (row_lse_i - s_ii) + c_i (col_lse_i - s_ii)) / 2 (FusedInputs.col_weights)."""
    rows = row_lse if positive is None else row_lse - positive
    cols = col_lse if positive is None else col_lse - positive
    rows = rows if inputs.row_weights is None else _weighted(rows, inputs.row_weights)
    return 0.5 * (rows + _weighted(cols, inputs.col_weights))


def _forward_pass(fused_pass, needs, inputs, gram, false_negatives=None):
    """(loss (reduced, in the accumulation dtype), row_lse, col_lse or None, InputGradients
    formed in the forward pass or None); ``gram``: the product is the symmetric Gram matrix of
    the queries (FusedPass.uses_gram); ``false_negatives``: the filter (false_negatives.py)."""
    key = inputs.query if inputs.key is None else inputs.key
    operands = prepare(fused_pass, inputs.query, key, inputs.bank, inputs.per_query,
                       inputs.scale, gram=gram)
    product = product_of(operands, fused_pass, inputs.targets, inputs.query_ids, inputs.bank_ids)
    positive = positive_scores(operands, inputs.targets) if fused_pass.uses_positive else None
    extra = extra_scores(operands, fused_pass, positive)
    extra_lse = None if extra is None else torch.logsumexp(extra, dim=1)
    masks = dict(row_ids=product.row_ids, col_ids=product.col_ids, backend=fused_pass.backend,
                 **_filter_of(false_negatives, operands, fused_pass, positive, inputs.targets))
    col_lse = None
    fused_gradients = None
    if gram:
        row_lse = gram_lse_forward(operands.query, operands.alpha, product.beta,
                                   exclude_diag=True, **masks)
    elif fused_pass.fuses_gradient(needs, product.keys is not None):
        g = reduction_weights(fused_pass.reduction, inputs.query.shape[0],
                              operands.alpha.new_tensor(1.0), operands.alpha.dtype,
                              inputs.row_weights).contiguous()
        row_lse, dquery, dkeys = masked_lse_forward_with_grad(
            operands.query, product.keys, operands.alpha, product.beta, g, extra_lse=extra_lse,
            exclude_diag=fused_pass.excludes_diagonal, diag_offset=0,
            need_dq=needs.query or needs.scale, need_dkeys=needs.key or needs.bank, **masks)
        fused_gradients = input_gradients(
            fused_pass, operands, product, targets=inputs.targets, positive=positive,
            row_lse=row_lse, col_lse=None, g=g, needs=needs,
            kernel_gradients=(_present(dquery), _present(dkeys)))
    elif product.keys is not None:
        row_lse, col_lse = masked_lse_forward(
            operands.query, product.keys, operands.alpha, product.beta,
            exclude_diag=fused_pass.excludes_diagonal, diag_offset=0,
            with_col_lse=fused_pass.symmetric, **masks)
        row_lse = _logaddexp(row_lse, extra_lse)
        col_lse = col_lse if fused_pass.symmetric else None
    else:
        row_lse = extra_lse
    if fused_pass.symmetric and inputs.col_weights is not None:
        return (reduce_loss(_weighted_symmetric(row_lse, col_lse, positive, inputs),
                            fused_pass.reduction), row_lse, col_lse, fused_gradients)
    if fused_pass.symmetric:
        loss = 0.5 * (row_lse + col_lse) - positive
    elif fused_pass.subtract_positive:
        loss = row_lse - positive
    else:
        loss = row_lse.clone()  # the loss and the saved row_lse are distinct outputs
    if fused_pass.positive_is_candidate:
        loss = non_negative(loss, candidate_count(fused_pass, operands) == 1)
    if inputs.row_weights is not None:
        loss = _weighted(loss, inputs.row_weights)
    return reduce_loss(loss, fused_pass.reduction), row_lse, col_lse, fused_gradients


class FusedInfoNCE(torch.autograd.Function):
    """InfoNCE (docs/design.md section 1) on the masked-LSE kernel ops.

    apply(*FusedInputs, fused_pass, needs, false_negatives) -> (loss, row_lse, col_lse,
    *fused gradients); only
    the loss is differentiable. With row_weights and reduction "sum" the loss is
    sum_i w_i loss_i (the gradient is still formed in the forward pass, e.g. SupCon's mean over
    the anchors that have a positive). Call it through fused_loss."""

    @staticmethod
    def forward(query, key, bank, per_query, scale, targets, query_ids, bank_ids, row_weights,
                col_weights, fused_pass, needs, false_negatives=None):
        inputs = FusedInputs(query, key, bank, per_query, scale, targets, query_ids, bank_ids,
                             row_weights, col_weights)
        with serial_host_ops(fused_pass.backend):
            loss, row_lse, col_lse, fused = _forward_pass(fused_pass, needs, inputs,
                                                          inputs.uses_gram(fused_pass),
                                                          false_negatives)
        fused = [None] * 5 if fused is None else fused
        return (loss, row_lse, or_empty(col_lse, loss), *[or_empty(t, loss) for t in fused])

    @staticmethod
    def setup_context(ctx, inputs, output):
        inputs, (fused_pass, needs, *rest) = FusedInputs(*inputs[:10]), inputs[10:]
        _, row_lse, col_lse, *fused = output
        ctx.fused_pass, ctx.needs = fused_pass, needs
        ctx.false_negatives = rest[0] if rest else None  # no gradient: the guide is detached
        ctx.gram = inputs.uses_gram(fused_pass)
        has_product = fused_pass.in_batch_negatives or inputs.bank is not None
        ctx.fused = not ctx.gram and fused_pass.fuses_gradient(needs, has_product)
        ctx.dtypes = [None if t is None else t.dtype
                      for t in (inputs.query, inputs.key, inputs.bank, inputs.per_query,
                                inputs.scale)]
        ctx.mark_non_differentiable(row_lse, col_lse, *fused)
        # The outputs besides the loss get no gradient: left undefined (None in backward), not
        # materialised as zeros of their shapes (two (N, D) zero tensors for the fused
        # gradients would be the peak of info_nce's backward).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*inputs, row_lse, col_lse, *fused)

    @staticmethod
    def backward(ctx, grad_output, *_):
        if grad_output is None:  # no gradient reached the loss (set_materialize_grads(False))
            return (None,) * 13
        saved = ctx.saved_tensors  # checks the version counters: in-place edits raise here
        with torch.no_grad(), serial_host_ops(ctx.fused_pass.backend):
            grads = FusedInfoNCE._input_gradients(ctx, grad_output, saved)
            grads = cast_gradients(grads, ctx.dtypes)
        grads = first_order_only(grads, ctx.fused_pass.backend)
        return (*grads, None, None, None, None, None, None, None, None)

    @staticmethod
    def _input_gradients(ctx, grad_output, saved):
        fused_pass, needs = ctx.fused_pass, ctx.needs
        inputs = FusedInputs(*saved[:10])
        row_lse, col_lse, *fused = saved[10:]
        shared_key = inputs.key is None
        if ctx.fused:
            grads = InputGradients(*scaled_fused_gradients(fused, needs, grad_output))
        else:
            key = inputs.query if shared_key else inputs.key
            operands = prepare(fused_pass, inputs.query, key, inputs.bank, inputs.per_query,
                               inputs.scale, gram=ctx.gram)
            product = product_of(operands, fused_pass, inputs.targets, inputs.query_ids,
                                 inputs.bank_ids)
            g = reduction_weights(fused_pass.reduction, inputs.query.shape[0], grad_output,
                                  operands.alpha.dtype, inputs.row_weights).contiguous()
            col_g = None if inputs.col_weights is None else reduction_weights(
                fused_pass.reduction, inputs.query.shape[0], grad_output, operands.alpha.dtype,
                inputs.col_weights).contiguous()
            # The backward needs s_{i,t_i} only where it is a candidate outside the product, or
            # for the false-negative filter's thresholds (recomputed: the same bits).
            positive = (positive_scores(operands, inputs.targets)
                        if fused_pass.positive_in_extra or ctx.false_negatives else None)
            terms = dict(targets=inputs.targets, positive=positive, row_lse=row_lse, g=g,
                         needs=needs)
            if ctx.gram:
                grads = gram_input_gradients(fused_pass, operands, product, **terms)
            else:
                lse_filter = _filter_of(ctx.false_negatives, operands, fused_pass, positive,
                                        inputs.targets)
                grads = input_gradients(fused_pass, operands, product, col_lse=_present(col_lse),
                                        col_g=col_g, lse_filter=lse_filter, **terms)
        if shared_key:  # one tensor in both roles: its gradient is the sum of both
            dquery, dkey = grads.query, grads.key
            merged = dkey if dquery is None else dquery if dkey is None else dquery + dkey
            grads = grads._replace(query=merged, key=None)
        return list(grads)


def fused_loss(fused_pass, query, key, *, scale, bank=None, per_query=None, targets=None,
               query_ids=None, bank_ids=None, row_weights=None, col_weights=None,
               false_negatives=None):
    """The loss of one fused pass (FusedInfoNCE) over FusedInputs given by keyword;
    ``false_negatives``: a false_negatives.FalseNegatives filter (no gram)."""
    needs = Needs(*requires_grad(query, key, bank, per_query, scale))
    # One tensor in the roles of query and key (NT-Xent's views, SupCon) goes in once: as two
    # inputs of one autograd.Function it would break the graph under torch.compile.
    key = None if key is query else key
    inputs = FusedInputs(query=query, key=key, bank=bank, per_query=per_query, scale=scale,
                         targets=targets, query_ids=query_ids, bank_ids=bank_ids,
                         row_weights=row_weights, col_weights=col_weights)
    return FusedInfoNCE.apply(*inputs, fused_pass, needs, false_negatives)[0]


def upcast_inputs(fused_pass, *tensors):
    """(fused_pass, tensors) for an objective whose inputs also feed host terms with autograd
    (DCLW, HCL, SupCon): low-precision inputs go in as ONE float32 copy each (the same object where
    one tensor plays two roles), so that the gradients of the fused pass and of the host terms
    are summed in float32 and cast once; a float16 sum of two large, cancelling parts would
    overflow. The kernels still read the original dtype (fused_pass.kernel_dtype)."""
    first = tensors[0]
    if first.dtype not in (torch.float16, torch.bfloat16):
        return fused_pass, tensors
    upcast = {}
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if id(t) not in upcast:
            upcast[id(t)] = t.float()
        out.append(upcast[id(t)])
    return replace(fused_pass, kernel_dtype=first.dtype), tuple(out)
