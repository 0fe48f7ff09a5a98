"""The host gradient maths of a fused pass: from the kernels' gradients of the log-sum-exp to the
gradients of every input (query, key, bank, per_query, scale).

    d loss_i / d s_{i,t_i} = g_i (p_{i,t_i} [a candidate outside the product] - 1 [subtracted])
    d loss / d scale = sum_ij dS_ij s_ij / scale = sum_i <dquery_i, query_i> / scale
and the backward of the L2 normalisation (normalize_backward), so the temperature needs no
kernel support. g (N,) are the per-row weights of the reduction times grad_output."""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._host import normalized_copy_backward_, rowwise_dot
from .ops import gram_lse_backward, masked_lse_backward
from .operands import per_query_scores, positive_chunks

__all__ = ["Needs", "InputGradients", "input_gradients", "gram_input_gradients"]


class Needs(NamedTuple):
    """Which inputs of a fused pass require a gradient."""

    query: bool
    key: bool
    bank: bool
    per_query: bool
    scale: bool


class InputGradients(NamedTuple):
    """The gradients of a fused pass's inputs (None where not needed)."""

    query: Optional[Tensor]
    key: Optional[Tensor]
    bank: Optional[Tensor]
    per_query: Optional[Tensor]
    scale: Optional[Tensor]


def normalize_backward(grad, t, inv, operands, normalize, eps):
    """Chain rule through t_hat = t * inv (inv = 1/max(||t||, eps)), in place on ``grad``.

    ``grad`` is d/dt (scales mode, inv already applied) or d/dt_hat (normalised-copies mode):
        scales:  dt = grad - inv^2 t <t, grad>      copies: dt = inv (grad - t_hat <t_hat, grad>)
    Where the eps clamp is active the map is linear and the projection term vanishes."""
    if not normalize:
        return grad
    flat_g = grad.reshape(-1, grad.shape[-1])
    flat_t = t.reshape(-1, t.shape[-1])
    flat_inv = inv.reshape(-1)
    if operands.prenormalized:
        normalized_copy_backward_(flat_g, flat_t, flat_inv, eps)
        return grad
    unclamped = (flat_inv < 1.0 / eps).to(flat_inv.dtype)
    coef = rowwise_dot(flat_t, flat_g) * unclamped * flat_inv * flat_inv
    flat_g.addcmul_(flat_t.to(flat_g.dtype), coef.unsqueeze(1).to(flat_g.dtype), value=-1)
    return grad


def add_positive_gradients(fused_pass, operands, targets, positive, row_lse, g, dquery, dkey):
    """dquery_i += c_i key_{t_i}, dkey_{t_i} += c_i query_i with c_i = d loss_i / d s_{i,t_i}
    * alpha_i beta_{t_i}, chunk by chunk where a chunk would need an (N, D) temporary
    (operands.positive_chunks)."""
    acc = operands.alpha.dtype
    coef = -g.to(acc) if fused_pass.subtract_positive else torch.zeros_like(g, dtype=acc)
    if fused_pass.positive_in_extra:
        coef = coef + g * torch.exp(positive - row_lse)
    coef = coef * operands.alpha * operands.positive_key_scales(targets)
    for r0, r1 in positive_chunks(operands, targets):
        c = coef[r0:r1].unsqueeze(1)
        if dquery is not None:
            dquery[r0:r1].addcmul_(operands.positive_keys(targets, r0, r1).to(acc), c)
        if dkey is not None:
            if targets is None:
                dkey[r0:r1].addcmul_(operands.query[r0:r1].to(acc), c)
            else:
                dkey.index_add_(0, targets[r0:r1], operands.query[r0:r1].to(acc) * c)


def _product_gradients(fused_pass, operands, product, row_lse, col_lse, g, col_g, want_dquery,
                       want_dkeys, lse_filter):
    """(dquery, dkeys) of the product's log-sum-exp from masked_lse_backward (None without a
    product): the row term with weights g, and for a symmetric loss half of each direction (the
    columns with weights col_g)."""
    if product.keys is None:
        return None, None
    row_grad = 0.5 * g if fused_pass.symmetric else g
    symmetric = fused_pass.symmetric
    return masked_lse_backward(
        operands.query, product.keys, operands.alpha, product.beta, row_lse, row_grad,
        col_lse=col_lse if symmetric else None, col_grad=0.5 * col_g if symmetric else None,
        row_ids=product.row_ids, col_ids=product.col_ids,
        exclude_diag=fused_pass.excludes_diagonal, diag_offset=0, need_dq=want_dquery,
        need_dkeys=want_dkeys, backend=fused_pass.backend, **lse_filter)


def input_gradients(fused_pass, operands, product, *, targets, positive, row_lse, col_lse, g,
                    needs, kernel_gradients=None, lse_filter=None, col_g=None):
    """InputGradients for per-row weights g (N,) (a symmetric pass: col_g (N,) for the column
    terms, None: g). ``positive`` = s_{i,t_i} (where the loss uses it); ``kernel_gradients`` =
    (dquery, dkeys) the backend already formed in the forward pass, or None to run
    masked_lse_backward now; ``lse_filter``: the false-negative filter's op keywords (none: no
    filter)."""
    col_g = g if col_g is None else col_g
    acc = operands.alpha.dtype
    device = operands.query.device
    want_dquery = needs.query or needs.scale
    if kernel_gradients is None:
        kernel_gradients = _product_gradients(fused_pass, operands, product, row_lse, col_lse,
                                              g, col_g, want_dquery, needs.key or needs.bank,
                                              lse_filter or {})
    dquery, dkeys = kernel_gradients
    if want_dquery and dquery is None:
        dquery = torch.zeros(operands.query.shape, dtype=acc, device=device)
    elif not want_dquery:
        dquery = None
    dkey = None
    if needs.key:
        dkey = dkeys[:operands.n_key] if (fused_pass.in_batch_negatives and dkeys is not None) \
            else torch.zeros(operands.key.shape, dtype=acc, device=device)
    dbank = None
    if needs.bank and dkeys is not None:
        dbank = dkeys[dkeys.shape[0] - operands.bank.shape[0]:]

    # A positive inside the product gets its p through the kernel; without either term (a plain
    # log-sum-exp, e.g. SupCon's denominator) there is nothing to add.
    if fused_pass.uses_positive:  # symmetric: s_ii is subtracted from both halves
        positive_g = 0.5 * (g + col_g) if fused_pass.symmetric else g
        add_positive_gradients(fused_pass, operands, targets, positive, row_lse, positive_g,
                               dquery, dkey)

    dper_query = None
    if operands.per_query is not None:
        gamma = operands.key_scales(operands.inv_per_query)
        d_s = g.unsqueeze(1) * torch.exp(per_query_scores(operands) - row_lse.unsqueeze(1))
        weighted = d_s * gamma * operands.alpha.unsqueeze(1)
        if want_dquery:
            dquery.add_(torch.einsum("nk,nkd->nd", weighted, operands.per_query.to(acc)))
        if needs.per_query:
            dper_query = weighted.unsqueeze(2) * operands.query.to(acc).unsqueeze(1)

    # Before normalisation: sum_ij dS_ij s_ij = sum_i <dquery_i, query_i>.
    dscale = rowwise_dot(operands.query, dquery).sum() / operands.scale if needs.scale else None

    def unnormalized(grad, t, inv):
        if grad is None:
            return None
        return normalize_backward(grad, t, inv, operands, fused_pass.normalize, fused_pass.eps)

    return InputGradients(
        query=unnormalized(dquery, operands.query, operands.inv_query) if needs.query else None,
        key=unnormalized(dkey, operands.key, operands.inv_key),
        bank=unnormalized(dbank, operands.bank, operands.inv_bank),
        per_query=unnormalized(dper_query, operands.per_query, operands.inv_per_query),
        scale=dscale)


def gram_input_gradients(fused_pass, operands, product, *, targets, positive, row_lse, g,
                         needs):
    """InputGradients of a symmetric-Gram pass: z's gradient in both roles, in the query slot
    (the key slot stays None: FusedInfoNCE sums nothing). The positive's gradient goes to both
    rows of each pair, so sum_i <dz_i, z_i> counts every score twice: d scale = that /
    (2 scale)."""
    dz = gram_lse_backward(operands.query, operands.alpha, product.beta, row_lse, g,
                           row_ids=product.row_ids, col_ids=product.col_ids, exclude_diag=True,
                           backend=fused_pass.backend).to(operands.alpha.dtype)
    if fused_pass.uses_positive:
        add_positive_gradients(fused_pass, operands, targets, positive, row_lse, g, dz, dz)
    dscale = rowwise_dot(operands.query, dz).sum() / (2 * operands.scale) if needs.scale else None
    dquery = None
    if needs.query:
        dquery = normalize_backward(dz, operands.query, operands.inv_query, operands,
                                    fused_pass.normalize, fused_pass.eps)
    return InputGradients(query=dquery, key=None, bank=None, per_query=None, scale=dscale)
