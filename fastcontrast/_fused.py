"""Host code shared by every fused backend: one autograd.Function for the whole InfoNCE family.

A backend ("ops": fastcontrast._torch_chunked, fastcontrast._ext, fastcontrast.kernels.infonce)
only implements the masked log-sum-exp of a scaled product and its gradient:

    s_ij = alpha_i * beta_j * <x_i, y_j>,   entry (i, j) masked iff exclude_diag and j == i + offset,
                                            or row_ids_i == col_ids_j >= 0 (ids given)
    masked_lse_forward  -> row_lse_i = logsumexp_j s_ij   (and col_lse_j = logsumexp_i s_ij)
    masked_lse_backward -> with dS_ij = g_i exp(s_ij - row_lse_i) + c_j exp(s_ij - col_lse_j):
                           dx_i = alpha_i sum_j dS_ij beta_j y_j,  dy_j = beta_j sum_i dS_ij alpha_i x_i
    masked_lse_forward_with_grad (optional) -> both at once, no recompute (reduced losses only)

Everything else lives here, once: L2 normalisation (as the scales alpha/beta, or as normalised
copies when the backend prefers them), the positive score, the candidates that are not a tile of
the product (the positive when ``in_batch_negatives`` is False, per-query negatives (N, K, D)),
merging their log-sum-exp with the kernel's, the loss, and all gradients:

    loss_i = lse_i - s_{i,t_i}   (symmetric: (row_lse_i + col_lse_i) / 2 - s_ii)
    d loss / d s_{i,t_i} = g_i (p_{i,t_i} - 1),   d tau = -(1/tau) sum_{ij} dS_ij s_ij
Options: ``exclude_positive`` removes the positive from the candidates (DCL: masked by ids
row_ids = t, col_ids = key index inside the product); ``subtract_positive=False`` returns lse_i
alone (the building block of fastcontrast._objectives); ``mask_ids`` = (query ids (N,), bank ids
(K,)) excludes bank entries of the query's own instance.
and sum_ij dS_ij s_ij = sum_i <dx_i, x_i>, so the temperature gradient needs no kernel support.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from .reference import reduce_loss, reduction_weights

# Rows per chunk for the O(N * D) host helpers below: bounds their temporaries.
_HOST_CHUNK_ROWS = 4096


@dataclass(frozen=True)
class InfoNCEConfig:
    """The static options of one fused InfoNCE call (validated by fastcontrast.functional)."""

    in_batch_negatives: bool = True
    exclude_self: bool = False
    symmetric: bool = False
    normalize: bool = True
    reduction: str = "mean"
    exclude_positive: bool = False  # DCL: the positive is not a candidate (not in the lse)
    subtract_positive: bool = True  # False: loss_i = lse_i (no "- s_{i,t_i}")
    grad_enabled: bool = True
    eps: float = 1e-12  # as torch.nn.functional.normalize


def _compute_dtype(ops, dtype):
    """The dtype the backend computes in: the input's when supported, else float32."""
    return dtype if dtype in ops.SUPPORTED_DTYPES else torch.float32


def _accumulate_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inverse_norms(x, normalize, eps, acc):
    """1 / max(||x||, eps) over the last dim in ``acc`` precision (ones when not normalising)."""
    if not normalize:
        return torch.ones(x.shape[:-1], dtype=acc, device=x.device)
    return torch.linalg.vector_norm(x, dim=-1, dtype=acc).clamp_min(eps).reciprocal()


def _rowwise_dot(a, b):
    """<a_i, b_i> for (R, D) tensors, in chunks so that no (R, D) temporary is made."""
    out = torch.empty(a.shape[0], dtype=_accumulate_dtype(a.dtype), device=a.device)
    for r0 in range(0, a.shape[0], _HOST_CHUNK_ROWS):
        r1 = r0 + _HOST_CHUNK_ROWS
        out[r0:r1] = torch.einsum("nd,nd->n", a[r0:r1].to(out.dtype), b[r0:r1].to(out.dtype))
    return out


def _positive_keys(op, targets, r0, r1):
    """key_{t_i} for rows r0..r1; without targets key i itself (a view, no copy)."""
    if targets is None:
        return op.key[r0:r1]
    return op.key.index_select(0, targets[r0:r1])


def _positive_key_scales(op, targets):
    """beta_{t_i} for every query."""
    beta = _key_scales(op, op.inv_key)
    return beta if targets is None else beta[targets]


@dataclass
class _Operands:
    """Inputs as the backend sees them: x (N, D), y (M_total, D) and their scale vectors."""

    x: torch.Tensor
    alpha: torch.Tensor
    scale: torch.Tensor
    inv_x: torch.Tensor
    key: torch.Tensor
    inv_key: torch.Tensor
    bank: Optional[torch.Tensor]
    inv_bank: Optional[torch.Tensor]
    per_query: Optional[torch.Tensor]
    inv_per_query: Optional[torch.Tensor]
    prenormalized: bool

    @property
    def n_key(self):
        return self.key.shape[0]


def _prepare(ops, cfg, query, key, bank, per_query, scale):
    """Cast to the compute dtype and fold normalisation into scales (or normalised copies)."""
    cdt = _compute_dtype(ops, query.dtype)
    acc = _accumulate_dtype(cdt)
    prenormalized = cfg.normalize and getattr(ops, "PREFERS_PRENORMALIZED", False)

    def prep(t):
        if t is None:
            return None, None
        t = t.to(cdt).contiguous()
        inv = _inverse_norms(t, cfg.normalize, cfg.eps, acc)
        if prenormalized:
            t = (t.to(acc) * inv.unsqueeze(-1)).to(cdt)
        return t, inv

    x, inv_x = prep(query)
    key_c, inv_key = prep(key)
    bank_c, inv_bank = prep(bank)
    per_query_c, inv_per_query = prep(per_query)
    scale = scale.to(acc)
    alpha = scale * (torch.ones_like(inv_x) if prenormalized else inv_x)
    return _Operands(x, alpha, scale, inv_x, key_c, inv_key, bank_c, inv_bank, per_query_c,
                     inv_per_query, prenormalized)


def _key_scales(op, inv):
    """beta for key-like rows: 1 for normalised copies, the inverse norms otherwise."""
    return torch.ones_like(inv) if op.prenormalized else inv


def _product_keys(op, cfg):
    """(y, beta) of the fused product: [key; bank] with in-batch negatives, else the bank alone."""
    parts = ([(op.key, op.inv_key)] if cfg.in_batch_negatives else [])
    if op.bank is not None:
        parts.append((op.bank, op.inv_bank))
    if not parts:
        return None, None
    if len(parts) == 1:
        y, inv = parts[0]
    else:
        y = torch.cat([p[0] for p in parts])
        inv = torch.cat([p[1] for p in parts])
    return y, _key_scales(op, inv)


def _product_ids(op, cfg, targets, mask_ids):
    """(row_ids, col_ids) of the id mask of the fused product [key; bank], or (None, None).

    exclude_positive with in-batch keys: row i masks key t_i (row id t_i, key j has id j).
    mask_ids = (query ids, bank ids): a bank entry with the query's id is masked (same instance)."""
    n, device = op.x.shape[0], op.x.device
    mask_positive = cfg.exclude_positive and cfg.in_batch_negatives
    if not mask_positive and mask_ids is None:
        return None, None
    cols = []
    if mask_positive:
        row_ids = torch.arange(n, device=device) if targets is None else targets
        cols.append(torch.arange(op.n_key, device=device))
    else:
        row_ids = mask_ids[0]
        if cfg.in_batch_negatives:
            cols.append(torch.full((op.n_key,), -1, dtype=torch.int64, device=device))
    if op.bank is not None:
        cols.append(mask_ids[1] if (mask_ids is not None and not mask_positive) else
                    torch.full((op.bank.shape[0],), -1, dtype=torch.int64, device=device))
    return row_ids.contiguous(), torch.cat(cols).contiguous()


def _positive_in_extra(cfg):
    """The positive is a candidate outside the fused product (in_batch_negatives=False, not DCL)."""
    return not cfg.in_batch_negatives and not cfg.exclude_positive


def _excludes_diagonal(cfg):
    """Key i is a column of the product only with in-batch negatives."""
    return cfg.exclude_self and cfg.in_batch_negatives


def _positive_scores(op, targets):
    """s_{i, t_i} = alpha_i beta_{t_i} <x_i, key_{t_i}>."""
    dots = torch.empty_like(op.alpha)
    for r0 in range(0, op.x.shape[0], _HOST_CHUNK_ROWS):
        r1 = r0 + _HOST_CHUNK_ROWS
        dots[r0:r1] = _rowwise_dot(op.x[r0:r1], _positive_keys(op, targets, r0, r1))
    return op.alpha * _positive_key_scales(op, targets) * dots


def _per_query_scores(op):
    """s_ik = alpha_i gamma_ik <x_i, n_ik> for per-query negatives (N, K, D): an (N, K) tensor."""
    gamma = _key_scales(op, op.inv_per_query)
    acc = op.alpha.dtype
    dots = torch.einsum("nd,nkd->nk", op.x.to(acc), op.per_query.to(acc))
    return op.alpha.unsqueeze(1) * gamma * dots


def _extra_scores(op, cfg, positive):
    """Scores of candidates outside the fused product, (N, E), or None."""
    extra = []
    if _positive_in_extra(cfg):
        extra.append(positive.unsqueeze(1))
    if op.per_query is not None:
        extra.append(_per_query_scores(op))
    return torch.cat(extra, dim=1) if extra else None


def _logaddexp(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return torch.logaddexp(a, b)


def _normalize_backward(grad, t, inv, op, normalize, eps):
    """Chain rule through t_hat = t * inv (inv = 1/max(||t||, eps)), in place on ``grad``.

    ``grad`` is d/dt (scales mode, inv already applied) or d/dt_hat (normalised-copies mode):
        scales:  dt = grad - inv^2 t <t, grad>          copies: dt = inv (grad - t_hat <t_hat, grad>)
    Where the eps clamp is active the map is linear and the projection term vanishes."""
    if not normalize:
        return grad
    flat_g = grad.reshape(-1, grad.shape[-1])
    flat_t = t.reshape(-1, t.shape[-1])
    flat_inv = inv.reshape(-1)
    unclamped = (flat_inv < 1.0 / eps).to(flat_inv.dtype)
    coef = _rowwise_dot(flat_t, flat_g) * unclamped
    if op.prenormalized:
        flat_g.addcmul_(flat_t.to(flat_g.dtype), coef.unsqueeze(1).to(flat_g.dtype), value=-1)
        flat_g.mul_(flat_inv.unsqueeze(1).to(flat_g.dtype))
    else:
        coef = coef * flat_inv * flat_inv
        flat_g.addcmul_(flat_t.to(flat_g.dtype), coef.unsqueeze(1).to(flat_g.dtype), value=-1)
    return grad


def _uses_positive(cfg):
    """Whether the loss involves s_{i,t_i} outside the kernel: subtracted, or a candidate merged
    into the log-sum-exp on the host."""
    return cfg.subtract_positive or _positive_in_extra(cfg)


def _add_positive_gradients(cfg, op, targets, positive, row_lse, g, dx, dkey):
    """dx_i += c_i key_{t_i}, dkey_{t_i} += c_i x_i with c_i = d loss_i / d s_{i,t_i} * alpha_i
    beta_{t_i}, chunk by chunk (no (N, D) temporary)."""
    acc = op.alpha.dtype
    coef = -g.to(acc) if cfg.subtract_positive else torch.zeros_like(g, dtype=acc)
    if _positive_in_extra(cfg):
        coef = coef + g * torch.exp(positive - row_lse)
    coef = coef * op.alpha * _positive_key_scales(op, targets)
    n = op.x.shape[0]
    for r0 in range(0, n, _HOST_CHUNK_ROWS):
        r1 = min(r0 + _HOST_CHUNK_ROWS, n)
        c = coef[r0:r1].unsqueeze(1)
        rows = None if targets is None else targets[r0:r1]
        if dx is not None:
            dx[r0:r1].addcmul_(_positive_keys(op, targets, r0, r1).to(acc), c)
        if dkey is not None:
            if rows is None:
                dkey[r0:r1].addcmul_(op.x[r0:r1].to(acc), c)
            else:
                dkey.index_add_(0, rows, op.x[r0:r1].to(acc) * c)


def _gradients(ops, cfg, op, targets, positive, y, beta, ids, row_lse, col_lse, g, kernel_grads,
               needs):
    """All input gradients for per-row weights g (N,). ``positive`` = s_{i,t_i};
    ``kernel_grads`` = (dx, dy) already computed by the backend (fused forward) or None to run
    masked_lse_backward now."""
    need_q, need_key, need_bank, need_per_query, need_scale = needs
    acc = op.alpha.dtype
    n = op.x.shape[0]
    want_dx = need_q or need_scale
    want_dy = need_key or need_bank
    if kernel_grads is not None:
        dx, dy = kernel_grads
    elif y is not None:
        row_grad = 0.5 * g if cfg.symmetric else g
        col_grad = row_grad if cfg.symmetric else None
        dx, dy = ops.masked_lse_backward(
            op.x, y, op.alpha, beta, row_lse, row_grad, col_lse, col_grad,
            exclude_diag=_excludes_diagonal(cfg), row_ids=ids[0], col_ids=ids[1],
            need_dq=want_dx, need_dkeys=want_dy)
    else:
        dx, dy = None, None
    if want_dx and dx is None:
        dx = torch.zeros(op.x.shape, dtype=acc, device=op.x.device)
    m = op.n_key
    dkey = None
    if need_key:
        dkey = dy[:m] if (cfg.in_batch_negatives and dy is not None) else \
            torch.zeros(op.key.shape, dtype=acc, device=op.x.device)
    dbank = dy[dy.shape[0] - op.bank.shape[0]:] if (need_bank and dy is not None) else None

    # Positive: d loss_i / d s_{i,t_i} = g_i (p_{i,t_i} [if a candidate outside the product]
    # - 1 [if subtracted]); a positive inside the product gets its p through the kernel, and
    # without either term (a plain log-sum-exp, e.g. SupCon's denominator) there is nothing to add.
    if _uses_positive(cfg):
        _add_positive_gradients(cfg, op, targets, positive, row_lse, g, dx if want_dx else None,
                                dkey)

    dper_query = None
    if op.per_query is not None:
        gamma = _key_scales(op, op.inv_per_query)
        d_s = g.unsqueeze(1) * torch.exp(_per_query_scores(op) - row_lse.unsqueeze(1))
        if want_dx:
            dx.add_(torch.einsum("nk,nkd->nd", d_s * gamma * op.alpha.unsqueeze(1),
                                 op.per_query.to(acc)))
        if need_per_query:
            dper_query = (d_s * gamma * op.alpha.unsqueeze(1)).unsqueeze(2) * op.x.to(acc).unsqueeze(1)

    # d/d scale = sum_ij dS_ij s_ij / scale = sum_i <dx_i, x_i> / scale (before normalisation).
    dscale = _rowwise_dot(op.x, dx).sum() / op.scale if need_scale else None
    norm_args = (op, cfg.normalize, cfg.eps)
    dq = _normalize_backward(dx, op.x, op.inv_x, *norm_args) if need_q else None
    if dkey is not None:
        dkey = _normalize_backward(dkey, op.key, op.inv_key, *norm_args)
    if dbank is not None:
        dbank = _normalize_backward(dbank, op.bank, op.inv_bank, *norm_args)
    if dper_query is not None:
        dper_query = _normalize_backward(dper_query, op.per_query, op.inv_per_query, *norm_args)
    return dq, dkey, dbank, dper_query, dscale


class FusedInfoNCE(torch.autograd.Function):
    """InfoNCE (DESIGN.md section 1) on a masked-LSE backend, O(N + M) memory beyond inputs.

    Inputs: ops (backend module), cfg (InfoNCEConfig), query (N, D), key (M, D), bank (K, D) or
    None, per_query (N, K, D) or None, scale = 1/temperature (0-dim tensor), targets (N,) or None,
    mask_ids None or (query ids (N,), bank ids (K,)) int64; row_weights None or (N,): with
    reduction "sum" the output is sum_i w_i loss_i (the gradient is still formed in the forward
    pass, e.g. SupCon's mean over the anchors that have a positive).
    """

    @staticmethod
    def forward(ctx, ops, cfg, query, key, bank, per_query, scale, targets, mask_ids=None,
                row_weights=None):
        op = _prepare(ops, cfg, query, key, bank, per_query, scale)
        y, beta = _product_keys(op, cfg)
        ids = _product_ids(op, cfg, targets, mask_ids)
        positive = _positive_scores(op, targets) if _uses_positive(cfg) else None
        extra = _extra_scores(op, cfg, positive)
        extra_lse = None if extra is None else torch.logsumexp(extra, dim=1)
        needs = tuple(t is not None and t.requires_grad and cfg.grad_enabled
                      for t in (query, key, bank, per_query, scale))
        n = query.shape[0]
        col_lse = None
        fused_grads = None
        can_fuse = (hasattr(ops, "masked_lse_forward_with_grad") and cfg.reduction != "none"
                    and not cfg.symmetric and any(needs) and y is not None)
        if can_fuse:
            g = reduction_weights(cfg.reduction, n, op.alpha.new_tensor(1.0), op.alpha.dtype,
                                  row_weights).contiguous()
            row_lse, dx, dy = ops.masked_lse_forward_with_grad(
                op.x, y, op.alpha, beta, g, exclude_diag=_excludes_diagonal(cfg), row_ids=ids[0],
                col_ids=ids[1], extra_lse=extra_lse, need_dq=needs[0] or needs[4],
                need_dkeys=needs[1] or needs[2])
            fused_grads = _gradients(ops, cfg, op, targets, positive, y, beta, ids, row_lse, None,
                                     g, (dx, dy), needs)
        elif y is not None:
            row_lse, col_lse = ops.masked_lse_forward(
                op.x, y, op.alpha, beta, exclude_diag=_excludes_diagonal(cfg), row_ids=ids[0],
                col_ids=ids[1], with_col_lse=cfg.symmetric)
            row_lse = _logaddexp(row_lse, extra_lse)
        else:
            row_lse = extra_lse
        if cfg.symmetric:
            loss = 0.5 * (row_lse + col_lse) - positive
        elif cfg.subtract_positive:
            loss = row_lse - positive
        else:
            loss = row_lse
        if row_weights is not None:  # a row of weight 0 may have no candidate (lse = -inf)
            w = row_weights.to(loss.dtype)
            loss = torch.where(w != 0, loss * w, torch.zeros_like(loss))
        out = reduce_loss(loss, cfg.reduction).to(query.dtype)

        ctx.cfg, ctx.ops = cfg, ops
        ctx.needs = needs
        ctx.dtypes = [None if t is None else t.dtype for t in (query, key, bank, per_query, scale)]
        # The fused gradients are handed out on the first backward (so autograd can adopt them
        # as .grad without a copy); a second backward (retain_graph=True) recomputes.
        ctx.fused_grads = fused_grads
        ctx.mask_ids, ctx.row_weights = mask_ids, row_weights
        ctx.save_for_backward(query, key, bank, per_query, scale, targets, row_lse, col_lse)
        return out

    @staticmethod
    def backward(ctx, grad_output):
        cfg = ctx.cfg
        if ctx.fused_grads is not None:
            grads, ctx.fused_grads = ctx.fused_grads, None
            if not bool(grad_output == 1):
                grads = [None if t is None else t.mul_(grad_output.to(t.dtype)) for t in grads]
        else:
            query, key, bank, per_query, scale, targets, row_lse, col_lse = ctx.saved_tensors
            op = _prepare(ctx.ops, cfg, query, key, bank, per_query, scale)
            y, beta = _product_keys(op, cfg)
            ids = _product_ids(op, cfg, targets, ctx.mask_ids)
            g = reduction_weights(cfg.reduction, query.shape[0], grad_output, op.alpha.dtype,
                                  ctx.row_weights).contiguous()
            positive = _positive_scores(op, targets) if _uses_positive(cfg) else None
            grads = list(_gradients(ctx.ops, cfg, op, targets, positive, y,
                                    beta, ids, row_lse, col_lse, g, None, ctx.needs))
        grads = [None if grad is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes)]
        return (None, None, *grads, None, None, None)
