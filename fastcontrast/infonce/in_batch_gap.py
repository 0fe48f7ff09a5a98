"""The label-smoothing gap of in-batch candidates (no bank, no per-query negatives) as one
autograd.Function whose backward writes each input's gradient into ONE (R, D) buffer:

    gap_i = <q^_i, k^_{t_i}> - (<q^_i, U> - x <q^_i, k^_i>) / C,   U = sum_j k^_j,  C = M - x
    symmetric (targets None, M == N): gap_i = (row gap_i + col gap_i) / 2,
    col gap_j = <k^_j, q^_j> - <k^_j, V> / N,                     V = sum_i q^_i

with q^ / k^ the rows scaled by their inverse norms a_i = 1 / max(|q_i|, eps), b_j (1 without
normalisation), t_i = i without targets and x = 1 under exclude_self (key i is not a candidate
of row i). label_smoothing.py gives the general form (bank, same-id masks, per-query negatives)
with plain autograd; the two are the same function (tests/objectives/test_label_smoothing.py
runs both against the float64 reference). Plain autograd of this form keeps about four (N, D)
gradient temporaries alive at once (one per product node and per norm), the largest part of
label smoothing's memory; here the gradient, for upstream weights h (row part h_r, column part
h_c = h / 2 where symmetric), is

    dq^_i = h_r,i (k^_{t_i} - U / C + x k^_i / C) + h_c,i k^_i - sum_j h_c,j k^_j / N
    dk^_j = sum_{i: t_i = j} h_r,i q^_i - sum_i h_r,i q^_i / C + x h_r,j q^_j / C
            + h_c,j (q^_j - V / N)
    dz_i  = a_i (dz^_i - z^_i <z^_i, dz^_i>)          (the row normalisation; dz = dz^ without)

formed in place with rank-1 updates (outer products of an (R,) and a (D,) vector)."""
import torch

from .._host import rowwise_dot

__all__ = ["in_batch_gap", "inverse_norms", "times", "unit_sum", "positive_dots",
           "in_batch_sums"]


def inverse_norms(t, normalize, eps):
    """1 / max(||t_j||, eps) per row (None without normalisation or without ``t``): the unit
    rows t^_j = t_j / max(||t_j||, eps) enter every sum through these scales, so no normalised
    (rows, D) copy is made."""
    if t is None or not normalize:
        return None
    return torch.linalg.vector_norm(t, dim=-1).clamp_min(eps).reciprocal()


def times(values, scales):
    """values * scales (values unchanged where ``scales`` is None)."""
    return values if scales is None else values * scales


def unit_sum(t, scales, weights=None):
    """sum_j w_j t^_j (D,), t^_j = scales_j t_j (w = 1 when ``weights`` is None)."""
    w = times(weights, scales) if weights is not None else scales
    return t.sum(dim=0) if w is None else w @ t


def positive_dots(q, keys, b, targets):
    """<q_i, k^_{t_i}> (N,), t_i = i without targets."""
    if targets is None:
        n = q.shape[0]
        return times(rowwise_dot(q, keys[:n]), None if b is None else b[:n])
    return times(rowwise_dot(q, keys.index_select(0, targets)),
                 None if b is None else b.index_select(0, targets))


def in_batch_sums(q, keys, b, exclude_self):
    """(sum_{j in C(i)} <q_i, k^_j> (N,), |C(i)| (an int)) over the in-batch keys: all of them,
    but key i under exclude_self (which means M == N)."""
    summed = q @ unit_sum(keys, b)
    if exclude_self:
        summed = summed - times(rowwise_dot(q, keys), b)
    return summed, keys.shape[0] - int(exclude_self)


def column_gap(q, keys, a, b):
    """col gap_j = <k^_j, q^_j> - <k^_j, V> / N of a symmetric loss (M == N, no targets)."""
    return times(times(rowwise_dot(keys, q), a) - keys @ unit_sum(q, a) / q.shape[0], b)


def _scaled_rows(t, coefficients, index=None):
    """A new (R, D) buffer: rows t_r (or t_{index_r}) times coefficients_r."""
    rows = t if index is None else t.index_select(0, index)
    return torch.mul(rows, coefficients.unsqueeze(1)) if index is None else rows.mul_(
        coefficients.unsqueeze(1))


def _unit_rows_backward_(grad, z, scales, eps):
    """In place on ``grad`` = dz^ (R, D): dz = a (dz^ - z^ <z^, dz^>), z^ = a z, from the raw
    rows z (no (R, D) z^ temporary); dz = a dz^ where the eps clamp is active."""
    if scales is None:
        return grad
    a = scales
    unclamped = (a < 1.0 / eps).to(a.dtype)
    coefficient = rowwise_dot(z, grad) * a * a * unclamped
    grad.addcmul_(z, coefficient.unsqueeze(1), value=-1)
    return grad.mul_(a.unsqueeze(1))


class _InBatchGap(torch.autograd.Function):
    """apply(query, key or None (the keys are the queries), targets or None, normalize, eps,
    exclude_self, symmetric) -> gap (N,) of the module docstring (without the scale)."""

    @staticmethod
    def forward(q, k, targets, normalize, eps, exclude_self, symmetric):
        keys = q if k is None else k
        a, b = inverse_norms(q, normalize, eps), inverse_norms(keys, normalize, eps)
        summed, count = in_batch_sums(q, keys, b, exclude_self)
        gap = times(positive_dots(q, keys, b, targets) - summed / count, a)
        if symmetric:
            gap = 0.5 * (gap + column_gap(q, keys, a, b))
        return gap

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, targets, normalize, eps, exclude_self, symmetric = inputs
        ctx.options = (normalize, eps, exclude_self, symmetric, k is None)
        ctx.save_for_backward(q, k, targets)

    @staticmethod
    def backward(ctx, h):
        q, k, targets = ctx.saved_tensors
        normalize, eps, exclude_self, symmetric, shared = ctx.options
        keys = q if shared else k
        a, b = inverse_norms(q, normalize, eps), inverse_norms(keys, normalize, eps)
        n, m = q.shape[0], keys.shape[0]
        count = m - int(exclude_self)
        h_rows = 0.5 * h if symmetric else h
        ha, hb = times(h_rows, a), times(h_rows, None if b is None else b[:n])
        # dq^ (N, D)
        if targets is None:
            dq = _scaled_rows(keys[:n], hb)
        else:
            dq = _scaled_rows(keys, times(h_rows, None if b is None else b[targets]), targets)
        dq.addr_(h_rows, unit_sum(keys, b), alpha=-1.0 / count)
        if exclude_self:
            dq.addcmul_(keys, (hb / count).unsqueeze(1))
        # dk^ (M, D)
        if targets is None and m == n:
            dk = _scaled_rows(q, ha)
        else:
            dk = torch.zeros_like(keys).index_add_(
                0, torch.arange(n, device=q.device) if targets is None else targets,
                _scaled_rows(q, ha))
        dk.sub_(unit_sum(q, a, h_rows) / count)
        if exclude_self:
            dk.addcmul_(q, (ha / count).unsqueeze(1))
        if symmetric:  # targets None, M == N
            h_cols = 0.5 * h
            hcb = times(h_cols, b)
            dq.addcmul_(keys, hcb.unsqueeze(1)).sub_(unit_sum(keys, b, h_cols) / n)
            dk.addcmul_(q, times(h_cols, a).unsqueeze(1)).addr_(h_cols, unit_sum(q, a),
                                                                 alpha=-1.0 / n)
        if shared:  # one tensor in both roles: one normalisation backward of the sum
            return _unit_rows_backward_(dq.add_(dk), q, a, eps), None, None, None, None, None, None
        return (_unit_rows_backward_(dq, q, a, eps), _unit_rows_backward_(dk, keys, b, eps),
                None, None, None, None, None)


def in_batch_gap(query, key, targets, *, normalize, eps, exclude_self, symmetric):
    """gap_i (N,) of the module docstring (without the scale), differentiable in query and key
    (``key is query``: one tensor in both roles, as NT-Xent's views)."""
    return _InBatchGap.apply(query, None if key is query else key, targets, normalize, eps,
                             exclude_self, symmetric)
