"""The InfoNCE op family (info_nce, clip_loss, nt_xent, supcon, moco_loss, DCL / DCLW / HCL):
its registered kernel ops, its options, its autograd, and its objectives, read top to bottom.

1. Kernel ops (torch.library, namespace ``fastcontrast``; a fake kernel each for meta tensors
   and torch.compile). Every loss of the family reduces to the masked log-sum-exp of a scaled
   product and its gradient:

       s_ij = alpha_i * beta_j * <x_i, y_j>,   entry (i, j) masked iff exclude_diag and
              j == i + diag_offset, or row_ids_i == col_ids_j >= 0 (ids given)
       masked_lse_forward            -> row_lse_i = logsumexp_j s_ij, col_lse_j = logsumexp_i s_ij
       masked_lse_backward           -> with dS_ij = g_i exp(s_ij - row_lse_i)
                                                     + c_j exp(s_ij - col_lse_j):
                                        dx_i = alpha_i sum_j dS_ij beta_j y_j,
                                        dy_j = beta_j sum_i dS_ij alpha_i x_i
       masked_lse_forward_with_grad  -> both in one pass, no recompute (backends that fuse it)

   The per-device kernel runs the implementation of the backend named in the call
   (fastcontrast.backends.kernels): kernels/infonce.py (triton), csrc/cpu/infonce.cpp (cpu),
   fastcontrast/_torch_chunked.py (torch). Absent optional outputs are empty (0-element) tensors.

   A set against itself (x = y = z, alpha = c beta: NT-Xent, SupCon, info_nce with exclude_self
   where the query is the key) has a symmetric s and goes through the symmetric-Gram ops, which
   compute only the tiles on and above the diagonal and use each for both its rows and columns
   (csrc/cpu/gram.cpp, kernels/gram.py; torch: a fall-through to the ops above):
       gram_lse_forward   -> row_lse_i = logsumexp_j s_ij
       gram_lse_backward  -> dz_i = sum_j alpha_i beta_j (dS_ij + dS_ji) z_j,
                             dS_ij = g_i exp(s_ij - row_lse_i)
   The mask must be symmetric there (the diagonal, ids of an involution such as NT-Xent's
   positives). FASTCONTRAST_GRAM=0 (read at every call) sends these losses through the
   full-product ops instead: the baseline of benchmarks/gram_targets.py.

2. ``FusedInfoNCE``: one autograd.Function for the whole family, O(N + M) memory beyond the
   inputs. The host part, once for every backend: L2 normalisation (folded into alpha / beta, or
   normalised copies when the backend prefers them and for the symmetric-Gram ops, where that
   one (N, D) copy of a one-tensor loss buys fp32 precision: see _prepare), the positive score,
   the candidates that are not a tile of the product (the positive when ``in_batch_negatives`` is
   False, per-query negatives (N, K, D)), merging their log-sum-exp with the kernel's, the loss,
   all gradients:

       loss_i = lse_i - s_{i,t_i}   (symmetric: (row_lse_i + col_lse_i) / 2 - s_ii)
       d loss / d s_{i,t_i} = g_i (p_{i,t_i} - 1),   d tau = -(1/tau) sum_ij dS_ij s_ij
   and sum_ij dS_ij s_ij = sum_i <dx_i, x_i>, so the temperature gradient needs no kernel support.

3. Objectives on top of the fused log-sum-exp (O(N D) per row, plain autograd):
   DCL  (Yeh et al. 2022)      loss_i = lse_{neg(i)} s - s_p(i)             (FusedInfoNCE alone)
   DCLW                        loss_i = lse_{neg(i)} s - w_i s_p(i),
                               w_i = 2 - N softmax_i(<q^_i, k^_t(i)> / sigma)
   HCL  (Robinson et al. 2021) log Ng_i = log(n_i) + lse_neg((1+beta) s) - lse_neg(beta s)
                               Ng_i <- max((Ng_i - tau_plus n_i e^{s_p}) / (1 - tau_plus),
                                           n_i e^{-1/tau})
                               loss_i = log(e^{s_p} + Ng_i) - s_p   (decoupled: log Ng_i - s_p)
   SupCon L_out (Khosla et al. 2020)
                               loss_a = lse_{b != a} s_ab - (1/|P(a)|) sum_{p in P(a)} s_ap
      with sum_{p in P(a)} s_ap = <z^_a, S_{c(a)}> / tau - <z^_a, z^_a> / tau, S_c the sum of
      the normalised features of class c: no N x N mask, no pass over the tiles.
   HCL costs two fused log-sum-exp passes (scales (1+beta)/tau and beta/tau; one when beta = 0).
"""
import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from ._config import settings
from ._host import (accumulate_dtype, cast_gradients, first_order_only, or_empty,
                    normalized_copy_backward_, reduce_loss, reduction_weights, requires_grad,
                    row_chunks, rowwise_dot, scaled_fused_gradients)
from ._supcon_positives import normalized_rows, supcon_positive_means

__all__ = ["InfoNCEOptions", "info_nce_loss", "supcon_loss", "masked_lse_forward",
           "masked_lse_backward", "masked_lse_forward_with_grad", "gram_lse_forward",
           "gram_lse_backward"]

# ---------------------------------------------------------------------------------------------
# 1. Kernel ops
# ---------------------------------------------------------------------------------------------


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


@torch.library.custom_op("fastcontrast::masked_lse_forward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def masked_lse_forward(q: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor,
                       row_ids: Optional[Tensor], col_ids: Optional[Tensor], exclude_diag: bool,
                       diag_offset: int, with_col_lse: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """(row_lse (N,), col_lse (M,), or (0,) without ``with_col_lse``); -inf where no entry."""
    q, keys, alpha, beta, row_ids, col_ids = _contiguous(q, keys, alpha, beta, row_ids, col_ids)
    row_lse, col_lse = backends.kernels("infonce", backend).masked_lse_forward(
        q, keys, alpha, beta, exclude_diag=exclude_diag, diag_offset=diag_offset,
        row_ids=row_ids, col_ids=col_ids, with_col_lse=with_col_lse)
    return row_lse, or_empty(col_lse, row_lse)


@masked_lse_forward.register_fake
def _forward_fake(q, keys, alpha, beta, row_ids, col_ids, exclude_diag, diag_offset,
                  with_col_lse, backend):
    dtype = backends.PROPERTIES[backend].output_dtype(q.dtype)
    return (q.new_empty(q.shape[0], dtype=dtype),
            q.new_empty(keys.shape[0] if with_col_lse else 0, dtype=dtype))


@torch.library.custom_op("fastcontrast::masked_lse_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def masked_lse_backward(q: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor, row_lse: Tensor,
                        row_grad: Tensor, col_lse: Optional[Tensor], col_grad: Optional[Tensor],
                        row_ids: Optional[Tensor], col_ids: Optional[Tensor], exclude_diag: bool,
                        diag_offset: int, need_dq: bool, need_dkeys: bool,
                        backend: str) -> Tuple[Tensor, Tensor]:
    """(dq (N, D), dkeys (M, D)), each (0,) when not needed; recomputes the score tiles."""
    args = _contiguous(q, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad, row_ids,
                       col_ids)
    q, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad, row_ids, col_ids = args
    dq, dkeys = backends.kernels("infonce", backend).masked_lse_backward(
        q, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad, exclude_diag=exclude_diag,
        diag_offset=diag_offset, row_ids=row_ids, col_ids=col_ids, need_dq=need_dq,
        need_dkeys=need_dkeys)
    return or_empty(dq, row_lse), or_empty(dkeys, row_lse)


def _fake_gradients(q, keys, need_dq, need_dkeys, backend):
    dtype = backends.PROPERTIES[backend].output_dtype(q.dtype)
    return (q.new_empty(q.shape if need_dq else (0,), dtype=dtype),
            q.new_empty(keys.shape if need_dkeys else (0,), dtype=dtype))


@masked_lse_backward.register_fake
def _backward_fake(q, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad, row_ids, col_ids,
                   exclude_diag, diag_offset, need_dq, need_dkeys, backend):
    return _fake_gradients(q, keys, need_dq, need_dkeys, backend)


@torch.library.custom_op("fastcontrast::masked_lse_forward_with_grad", mutates_args=(),
                         device_types=("cpu", "cuda"))
def masked_lse_forward_with_grad(q: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor,
                                 row_grad: Tensor, row_ids: Optional[Tensor],
                                 col_ids: Optional[Tensor], extra_lse: Optional[Tensor],
                                 exclude_diag: bool, diag_offset: int, need_dq: bool,
                                 need_dkeys: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(row_lse, dq, dkeys) in one pass over the scores: row_lse = logaddexp(this product's lse,
    extra_lse); dq / dkeys those of masked_lse_backward with that row_lse, no column term."""
    args = _contiguous(q, keys, alpha, beta, row_grad, row_ids, col_ids, extra_lse)
    q, keys, alpha, beta, row_grad, row_ids, col_ids, extra_lse = args
    row_lse, dq, dkeys = backends.kernels("infonce", backend).masked_lse_forward_with_grad(
        q, keys, alpha, beta, row_grad, exclude_diag=exclude_diag, diag_offset=diag_offset,
        row_ids=row_ids, col_ids=col_ids, extra_lse=extra_lse, need_dq=need_dq,
        need_dkeys=need_dkeys)
    return row_lse, or_empty(dq, row_lse), or_empty(dkeys, row_lse)


@masked_lse_forward_with_grad.register_fake
def _forward_with_grad_fake(q, keys, alpha, beta, row_grad, row_ids, col_ids, extra_lse,
                            exclude_diag, diag_offset, need_dq, need_dkeys, backend):
    dtype = backends.PROPERTIES[backend].output_dtype(q.dtype)
    return (q.new_empty(q.shape[0], dtype=dtype),
            *_fake_gradients(q, keys, need_dq, need_dkeys, backend))


def _gram_block_rows():
    """FASTCONTRAST_GRAM_BLOCK_ROWS (read at every call; tests force small blocks), 0: default."""
    return settings().gram_block_rows


@torch.library.custom_op("fastcontrast::gram_lse_forward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def gram_lse_forward(z: Tensor, alpha: Tensor, beta: Tensor, row_ids: Optional[Tensor],
                     col_ids: Optional[Tensor], exclude_diag: bool, backend: str) -> Tensor:
    """row_lse (N,) of the symmetric s_ij = alpha_i beta_j <z_i, z_j>; -inf where no entry."""
    z, alpha, beta, row_ids, col_ids = _contiguous(z, alpha, beta, row_ids, col_ids)
    return backends.kernels("gram", backend).gram_lse_forward(
        z, alpha, beta, exclude_diag=exclude_diag, row_ids=row_ids, col_ids=col_ids,
        block_rows=_gram_block_rows())


@gram_lse_forward.register_fake
def _gram_forward_fake(z, alpha, beta, row_ids, col_ids, exclude_diag, backend):
    return z.new_empty(z.shape[0], dtype=backends.PROPERTIES[backend].output_dtype(z.dtype))


@torch.library.custom_op("fastcontrast::gram_lse_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def gram_lse_backward(z: Tensor, alpha: Tensor, beta: Tensor, row_lse: Tensor, row_grad: Tensor,
                      row_ids: Optional[Tensor], col_ids: Optional[Tensor], exclude_diag: bool,
                      backend: str) -> Tensor:
    """dz (N, D): the gradient of sum_i row_grad_i row_lse_i through z in both roles."""
    args = _contiguous(z, alpha, beta, row_lse, row_grad, row_ids, col_ids)
    z, alpha, beta, row_lse, row_grad, row_ids, col_ids = args
    return backends.kernels("gram", backend).gram_lse_backward(
        z, alpha, beta, row_lse, row_grad, exclude_diag=exclude_diag, row_ids=row_ids,
        col_ids=col_ids, block_rows=_gram_block_rows())


@gram_lse_backward.register_fake
def _gram_backward_fake(z, alpha, beta, row_lse, row_grad, row_ids, col_ids, exclude_diag,
                        backend):
    return z.new_empty(z.shape, dtype=backends.PROPERTIES[backend].output_dtype(z.dtype))



# ---------------------------------------------------------------------------------------------
# 2. Options and the fused autograd.Function
# ---------------------------------------------------------------------------------------------


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

    @property
    def hard_negatives(self):
        return self.hcl_beta != 0 or self.hcl_tau_plus != 0

    @property
    def needs_host_terms(self):
        """DCLW / HCL: the loss is more than one fused log-sum-exp minus the positive."""
        return self.dclw_sigma is not None or self.hard_negatives


@dataclass(frozen=True)
class _FusedPass:
    """What one FusedInfoNCE call computes. ``exclude_positive``: the positive is not a candidate
    (DCL; masked by ids row_ids = t, col_ids = key index); ``subtract_positive=False``: loss_i is
    lse_i alone (the negatives' log-sum-exp of DCLW / HCL, SupCon's denominator).
    ``kernel_dtype``: the dtype the kernels read when an objective passes its low-precision
    inputs upcast to float32 (see _upcast_inputs); None: the inputs' own dtype."""

    backend: str
    in_batch_negatives: bool
    exclude_self: bool
    symmetric: bool
    normalize: bool
    reduction: str
    exclude_positive: bool
    subtract_positive: bool
    eps: float
    kernel_dtype: Optional[torch.dtype] = None
    involutive_targets: bool = False

    @property
    def properties(self):
        return backends.PROPERTIES[self.backend]


def _loss_pass(options):
    """The pass of a plain InfoNCE / DCL loss: lse over the candidates minus the positive."""
    return _FusedPass(options.backend, options.in_batch_negatives, options.exclude_self,
                      options.symmetric, options.normalize, options.reduction,
                      exclude_positive=options.decoupled, subtract_positive=True,
                      eps=options.eps, involutive_targets=options.involutive_targets)


def _negatives_pass(options):
    """The per-row log-sum-exp over the negatives alone (positive masked): DCLW and HCL."""
    return _FusedPass(options.backend, options.in_batch_negatives, options.exclude_self,
                      options.symmetric, options.normalize, "none", exclude_positive=True,
                      subtract_positive=False, eps=options.eps,
                      involutive_targets=options.involutive_targets)


def _inverse_norms(x, normalize, eps, acc):
    """1 / max(||x||, eps) over the last dim in ``acc`` precision (ones when not normalising)."""
    if not normalize:
        return torch.ones(x.shape[:-1], dtype=acc, device=x.device)
    return torch.linalg.vector_norm(x, dim=-1, dtype=acc).clamp_min(eps).reciprocal()


@dataclass
class _Operands:
    """Inputs as the kernels see them: x (N, D), keys / bank / per-query negatives, their
    inverse norms, the scale 1/tau and the row scales alpha."""

    x: Tensor
    alpha: Tensor
    scale: Tensor
    inv_x: Tensor
    key: Tensor
    inv_key: Tensor
    bank: Optional[Tensor]
    inv_bank: Optional[Tensor]
    per_query: Optional[Tensor]
    inv_per_query: Optional[Tensor]
    prenormalized: bool

    @property
    def n_key(self):
        return self.key.shape[0]

    def key_scales(self, inv):
        """beta for key-like rows: 1 for normalised copies, the inverse norms otherwise."""
        return torch.ones_like(inv) if self.prenormalized else inv

    def positive_keys(self, targets, r0, r1):
        """key_{t_i} for rows r0..r1; without targets key i itself (a view, no copy)."""
        return self.key[r0:r1] if targets is None else self.key.index_select(0, targets[r0:r1])

    def positive_key_scales(self, targets):
        beta = self.key_scales(self.inv_key)
        return beta if targets is None else beta[targets]


def _prepare(spec, query, key, bank, per_query, scale, gram=False):
    """Cast to the compute dtype and fold normalisation into scales (or normalised copies).

    ``gram`` (a symmetric-Gram pass, _uses_gram) always takes normalised copies: the scales
    alpha_i = 1/(tau |z_i|), beta_j = 1/|z_j| round each score three times over raw products,
    and where a SupCon denominator's gradient meets its positive term's (at low tau and D = 3)
    that cost a factor of plain PyTorch fp32's error; z / |z| once, as plain PyTorch does, meets
    it. The copy is one (N, D) tensor of a one-tensor loss (NT-Xent, SupCon)."""
    props = spec.properties
    cdt = props.compute_dtype(spec.kernel_dtype or query.dtype)
    acc = accumulate_dtype(cdt)
    prenormalized = spec.normalize and (props.prenormalized or gram)

    def prep(t):
        if t is None:
            return None, None
        t = t.to(cdt).contiguous()
        inv = _inverse_norms(t, spec.normalize, spec.eps, acc)
        if prenormalized:
            t = (t.to(acc) * inv.unsqueeze(-1)).to(cdt)
        return t, inv

    x, inv_x = prep(query)
    key_c, inv_key = (x, inv_x) if key is query else prep(key)  # NT-Xent, SupCon: one set
    bank_c, inv_bank = prep(bank)
    per_query_c, inv_per_query = prep(per_query)
    scale = scale.to(acc)
    alpha = scale * (torch.ones_like(inv_x) if prenormalized else inv_x)
    return _Operands(x, alpha, scale, inv_x, key_c, inv_key, bank_c, inv_bank, per_query_c,
                     inv_per_query, prenormalized)


def _product_keys(op, spec):
    """(y, beta) of the fused product: [key; bank] with in-batch negatives, else the bank alone."""
    parts = ([(op.key, op.inv_key)] if spec.in_batch_negatives else [])
    if op.bank is not None:
        parts.append((op.bank, op.inv_bank))
    if not parts:
        return None, None
    if len(parts) == 1:
        y, inv = parts[0]
    else:
        y = torch.cat([p[0] for p in parts])
        inv = torch.cat([p[1] for p in parts])
    return y, op.key_scales(inv)


def _product_ids(op, spec, targets, query_ids, bank_ids):
    """(row_ids, col_ids) of the id mask of the fused product [key; bank], or (None, None).

    exclude_positive with in-batch keys: row i masks key t_i (row id t_i, key j has id j), and
    bank_ids are not used (one id per row: _negatives_lse runs the bank apart under ids).
    (query_ids, bank_ids): a bank entry with the query's id is masked (same instance)."""
    n, device = op.x.shape[0], op.x.device
    mask_positive = spec.exclude_positive and spec.in_batch_negatives
    if not mask_positive and query_ids is None:
        return None, None
    cols = []
    if mask_positive:
        row_ids = torch.arange(n, device=device) if targets is None else targets
        cols.append(torch.arange(op.n_key, device=device))
    else:
        row_ids = query_ids
        if spec.in_batch_negatives:
            cols.append(torch.full((op.n_key,), -1, dtype=torch.int64, device=device))
    if op.bank is not None:
        cols.append(bank_ids if (query_ids is not None and not mask_positive) else
                    torch.full((op.bank.shape[0],), -1, dtype=torch.int64, device=device))
    return row_ids.contiguous(), torch.cat(cols).contiguous()


def _positive_in_extra(spec):
    """The positive is a candidate outside the fused product (in_batch_negatives=False, not DCL)."""
    return not spec.in_batch_negatives and not spec.exclude_positive


def _excludes_diagonal(spec):
    """Key i is a column of the product only with in-batch negatives."""
    return spec.exclude_self and spec.in_batch_negatives


def _uses_positive(spec):
    """Whether the loss involves s_{i,t_i} outside the kernel: subtracted, or a candidate merged
    into the log-sum-exp on the host."""
    return spec.subtract_positive or _positive_in_extra(spec)


def _positive_chunks(op, targets):
    """Row ranges of the positive's O(N D) passes: chunks (row_chunks) where a pass makes an
    (N, D) temporary (a gather of key_{t_i}, a cast to the accumulation dtype); one range where
    it works on views alone, so that it is one parallel op and not one per chunk (on a busy CPU
    each waits at its barrier for a descheduled thread)."""
    acc = op.alpha.dtype
    if targets is None and op.x.dtype == acc and op.key.dtype == acc:
        return [(0, op.x.shape[0])]
    return row_chunks(op.x.shape[0])


def _positive_scores(op, targets):
    """s_{i, t_i} = alpha_i beta_{t_i} <x_i, key_{t_i}>."""
    dots = torch.empty_like(op.alpha)
    for r0, r1 in _positive_chunks(op, targets):
        dots[r0:r1] = rowwise_dot(op.x[r0:r1], op.positive_keys(targets, r0, r1))
    return op.alpha * op.positive_key_scales(targets) * dots


def _per_query_scores(op):
    """s_ik = alpha_i gamma_ik <x_i, n_ik> for per-query negatives (N, K, D): an (N, K) tensor."""
    gamma = op.key_scales(op.inv_per_query)
    acc = op.alpha.dtype
    dots = torch.einsum("nd,nkd->nk", op.x.to(acc), op.per_query.to(acc))
    return op.alpha.unsqueeze(1) * gamma * dots


def _extra_scores(op, spec, positive):
    """Scores of candidates outside the fused product, (N, E), or None."""
    extra = []
    if _positive_in_extra(spec):
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
        scales:  dt = grad - inv^2 t <t, grad>      copies: dt = inv (grad - t_hat <t_hat, grad>)
    Where the eps clamp is active the map is linear and the projection term vanishes."""
    if not normalize:
        return grad
    flat_g = grad.reshape(-1, grad.shape[-1])
    flat_t = t.reshape(-1, t.shape[-1])
    flat_inv = inv.reshape(-1)
    if op.prenormalized:
        normalized_copy_backward_(flat_g, flat_t, flat_inv, eps)
        return grad
    unclamped = (flat_inv < 1.0 / eps).to(flat_inv.dtype)
    coef = rowwise_dot(flat_t, flat_g) * unclamped * flat_inv * flat_inv
    flat_g.addcmul_(flat_t.to(flat_g.dtype), coef.unsqueeze(1).to(flat_g.dtype), value=-1)
    return grad


def _add_positive_gradients(spec, op, targets, positive, row_lse, g, dx, dkey):
    """dx_i += c_i key_{t_i}, dkey_{t_i} += c_i x_i with c_i = d loss_i / d s_{i,t_i} * alpha_i
    beta_{t_i}, chunk by chunk where a chunk would need an (N, D) temporary (_positive_chunks)."""
    acc = op.alpha.dtype
    coef = -g.to(acc) if spec.subtract_positive else torch.zeros_like(g, dtype=acc)
    if _positive_in_extra(spec):
        coef = coef + g * torch.exp(positive - row_lse)
    coef = coef * op.alpha * op.positive_key_scales(targets)
    for r0, r1 in _positive_chunks(op, targets):
        c = coef[r0:r1].unsqueeze(1)
        if dx is not None:
            dx[r0:r1].addcmul_(op.positive_keys(targets, r0, r1).to(acc), c)
        if dkey is not None:
            if targets is None:
                dkey[r0:r1].addcmul_(op.x[r0:r1].to(acc), c)
            else:
                dkey.index_add_(0, targets[r0:r1], op.x[r0:r1].to(acc) * c)


def _gradients(spec, op, targets, positive, y, beta, ids, row_lse, col_lse, g, kernel_grads,
               needs):
    """All input gradients (query, key, bank, per_query, scale) for per-row weights g (N,).
    ``positive`` = s_{i,t_i}; ``kernel_grads`` = (dx, dy) already computed by the backend
    (fused forward) or None to run masked_lse_backward now."""
    need_q, need_key, need_bank, need_per_query, need_scale = needs
    acc = op.alpha.dtype
    want_dx = need_q or need_scale
    want_dy = need_key or need_bank
    if kernel_grads is not None:
        dx, dy = kernel_grads
    elif y is not None:
        row_grad = 0.5 * g if spec.symmetric else g
        has_col = spec.symmetric
        dx, dy = masked_lse_backward(
            op.x, y, op.alpha, beta, row_lse, row_grad, col_lse if has_col else None,
            row_grad if has_col else None, ids[0], ids[1], _excludes_diagonal(spec), 0, want_dx,
            want_dy, spec.backend)
    else:
        dx = dy = None
    dx = dx if want_dx and dx is not None else (
        torch.zeros(op.x.shape, dtype=acc, device=op.x.device) if want_dx else None)
    dkey = None
    if need_key:
        dkey = dy[:op.n_key] if (spec.in_batch_negatives and dy is not None) else \
            torch.zeros(op.key.shape, dtype=acc, device=op.x.device)
    dbank = dy[dy.shape[0] - op.bank.shape[0]:] if (need_bank and dy is not None) else None

    # Positive: d loss_i / d s_{i,t_i} = g_i (p_{i,t_i} [if a candidate outside the product]
    # - 1 [if subtracted]); a positive inside the product gets its p through the kernel, and
    # without either term (a plain log-sum-exp, e.g. SupCon's denominator) there is nothing to add.
    if _uses_positive(spec):
        _add_positive_gradients(spec, op, targets, positive, row_lse, g, dx, dkey)

    dper_query = None
    if op.per_query is not None:
        gamma = op.key_scales(op.inv_per_query)
        d_s = g.unsqueeze(1) * torch.exp(_per_query_scores(op) - row_lse.unsqueeze(1))
        weighted = d_s * gamma * op.alpha.unsqueeze(1)
        if want_dx:
            dx.add_(torch.einsum("nk,nkd->nd", weighted, op.per_query.to(acc)))
        if need_per_query:
            dper_query = weighted.unsqueeze(2) * op.x.to(acc).unsqueeze(1)

    # d/d scale = sum_ij dS_ij s_ij / scale = sum_i <dx_i, x_i> / scale (before normalisation).
    dscale = rowwise_dot(op.x, dx).sum() / op.scale if need_scale else None
    norm_args = (op, spec.normalize, spec.eps)
    dq = _normalize_backward(dx, op.x, op.inv_x, *norm_args) if need_q else None
    if dkey is not None:
        dkey = _normalize_backward(dkey, op.key, op.inv_key, *norm_args)
    if dbank is not None:
        dbank = _normalize_backward(dbank, op.bank, op.inv_bank, *norm_args)
    if dper_query is not None:
        dper_query = _normalize_backward(dper_query, op.per_query, op.inv_per_query, *norm_args)
    return dq, dkey, dbank, dper_query, dscale


def _uses_gram(spec, shared_key, bank, per_query, targets):
    """Whether the product is a set against itself with a symmetric mask, for the symmetric-Gram
    ops: one tensor as query and key, key i excluded from row i, no other candidates, and the
    positive mask (DCL) symmetric. FASTCONTRAST_GRAM=0 (read at every call) turns it off."""
    if not settings().gram:
        return False
    symmetric_mask = not spec.exclude_positive or targets is None or spec.involutive_targets
    return (shared_key and _excludes_diagonal(spec) and not spec.symmetric and bank is None
            and per_query is None and symmetric_mask)


def _gram_gradients(spec, op, targets, positive, beta, ids, row_lse, g, needs):
    """(dz, None, None, None, dscale) of a symmetric-Gram pass: z's gradient in both roles (the
    key slot stays None, FusedInfoNCE sums nothing). The positive's gradient goes to both rows of
    each pair, so sum_i <dz_i, z_i> counts every score twice: d scale = that / (2 scale)."""
    need_q, _, _, _, need_scale = needs
    dz = gram_lse_backward(op.x, op.alpha, beta, row_lse, g, ids[0], ids[1], True, spec.backend)
    dz = dz.to(op.alpha.dtype)
    if _uses_positive(spec):
        _add_positive_gradients(spec, op, targets, positive, row_lse, g, dz, dz)
    dscale = rowwise_dot(op.x, dz).sum() / (2 * op.scale) if need_scale else None
    dq = _normalize_backward(dz, op.x, op.inv_x, op, spec.normalize, spec.eps) if need_q else None
    return dq, None, None, None, dscale


def _fuses_gradient(spec, needs, has_product):
    """The backend forms the gradient in the forward pass: a reduced, one-directional loss."""
    return (spec.properties.fuses_gradient and spec.reduction != "none" and not spec.symmetric
            and any(needs) and has_product)


def _forward_pass(spec, needs, query, key, bank, per_query, scale, targets, query_ids, bank_ids,
                  row_weights, gram=False):
    """(loss (reduced, in the accumulation dtype), row_lse, col_lse or None, fused gradients or
    None); ``gram``: the product is the symmetric Gram matrix of the queries (_uses_gram)."""
    op = _prepare(spec, query, key, bank, per_query, scale, gram)
    y, beta = _product_keys(op, spec)
    ids = _product_ids(op, spec, targets, query_ids, bank_ids)
    positive = _positive_scores(op, targets) if _uses_positive(spec) else None
    extra = _extra_scores(op, spec, positive)
    extra_lse = None if extra is None else torch.logsumexp(extra, dim=1)
    n = query.shape[0]
    col_lse = None
    fused_grads = None
    if gram:
        row_lse = gram_lse_forward(op.x, op.alpha, beta, ids[0], ids[1], True, spec.backend)
    elif _fuses_gradient(spec, needs, y is not None):
        g = reduction_weights(spec.reduction, n, op.alpha.new_tensor(1.0), op.alpha.dtype,
                              row_weights).contiguous()
        row_lse, dx, dy = masked_lse_forward_with_grad(
            op.x, y, op.alpha, beta, g, ids[0], ids[1], extra_lse, _excludes_diagonal(spec), 0,
            needs[0] or needs[4], needs[1] or needs[2], spec.backend)
        fused_grads = _gradients(spec, op, targets, positive, y, beta, ids, row_lse, None, g,
                                 (_present(dx), _present(dy)), needs)
    elif y is not None:
        row_lse, col_lse = masked_lse_forward(op.x, y, op.alpha, beta, ids[0], ids[1],
                                              _excludes_diagonal(spec), 0, spec.symmetric,
                                              spec.backend)
        row_lse = _logaddexp(row_lse, extra_lse)
        col_lse = col_lse if spec.symmetric else None
    else:
        row_lse = extra_lse
    if spec.symmetric:
        loss = 0.5 * (row_lse + col_lse) - positive
    elif spec.subtract_positive:
        loss = row_lse - positive
    else:
        loss = row_lse.clone()  # the loss and the saved row_lse are distinct outputs
    if _positive_is_candidate(spec):
        loss = _non_negative(loss, _candidate_count(spec, op) == 1)
    if row_weights is not None:  # a row of weight 0 may have no candidate (lse = -inf)
        w = row_weights.to(loss.dtype)
        loss = torch.where(w != 0, loss * w, torch.zeros_like(loss))
    return reduce_loss(loss, spec.reduction), row_lse, col_lse, fused_grads


def _positive_is_candidate(spec):
    """loss_i = lse over candidates that include s_{i,t_i}, minus s_{i,t_i}: never below 0."""
    return spec.subtract_positive and not spec.exclude_positive


def _candidate_count(spec, op):
    """Candidates per row before id masks: the product's keys (or the positive alone), minus
    key i with exclude_self, plus the bank and the per-query negatives."""
    count = (op.n_key - int(_excludes_diagonal(spec))) if spec.in_batch_negatives else 1
    count += 0 if op.bank is None else op.bank.shape[0]
    return count + (0 if op.per_query is None else op.per_query.shape[1])


def _non_negative(loss, single_candidate):
    """The loss value where the positive is a candidate (the gradient is the kernels'): the
    positive's score inside the log-sum-exp and the subtracted one are computed apart, so
    round-off can leave loss_i a few ulp below 0; it is clamped there. A row whose only
    candidate is the positive is s - s: exactly 0 (NaN for a non-finite score, as in the
    cross-entropy form). NaN propagates either way."""
    return loss * 0 if single_candidate else loss.clamp_min(0)


def _present(t):
    """None for the 0-element placeholder of an absent op output."""
    return None if t.numel() == 0 and t.dim() == 1 else t


class FusedInfoNCE(torch.autograd.Function):
    """InfoNCE (DESIGN.md section 1) on the masked-LSE kernel ops, O(N + M) memory beyond inputs.

    apply(query (N, D), key (M, D) or None (the keys are the queries), bank (K, D) or None,
    per_query (N, K, D) or None, scale = 1/temperature (0-dim), targets (N,) or None,
    query_ids (N,) / bank_ids (K,) or None,
    row_weights (N,) or None, spec (_FusedPass), needs (requires-grad of query, key, bank,
    per_query, scale)) -> (loss, row_lse, col_lse, *fused gradients); only the loss is
    differentiable. With row_weights and reduction "sum" the loss is sum_i w_i loss_i (the
    gradient is still formed in the forward pass, e.g. SupCon's mean over the anchors that have
    a positive). A fusing backend returns the gradient for grad_output = 1 with the loss and the
    backward scales it; otherwise the backward recomputes the tiles."""

    @staticmethod
    def forward(query, key, bank, per_query, scale, targets, query_ids, bank_ids, row_weights,
                spec, needs):
        gram = _uses_gram(spec, key is None, bank, per_query, targets)
        key = query if key is None else key  # key None: the keys are the queries (_fused)
        loss, row_lse, col_lse, fused = _forward_pass(spec, needs, query, key, bank, per_query,
                                                      scale, targets, query_ids, bank_ids,
                                                      row_weights, gram)
        fused = [None] * 5 if fused is None else fused
        return (loss, row_lse, or_empty(col_lse, loss), *[or_empty(t, loss) for t in fused])

    @staticmethod
    def setup_context(ctx, inputs, output):
        query, key, bank, per_query, scale, targets, query_ids, bank_ids, row_weights, spec, \
            needs = inputs
        _, row_lse, col_lse, *fused = output
        ctx.spec, ctx.needs = spec, needs
        ctx.gram = _uses_gram(spec, key is None, bank, per_query, targets)
        ctx.fused = not ctx.gram and _fuses_gradient(spec, needs,
                                                     spec.in_batch_negatives or bank is not None)
        ctx.shared_key = key is None
        ctx.dtypes = [None if t is None else t.dtype for t in (query, key, bank, per_query, scale)]
        ctx.mark_non_differentiable(row_lse, col_lse, *fused)
        # The outputs besides the loss get no gradient: left undefined (None in backward), not
        # materialised as zeros of their shapes (the fused gradients' two (N, D) zero tensors
        # were the peak of info_nce's backward: 33.6 MB at N = M = 16384, D = 256 fp32).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(query, key, bank, per_query, scale, targets, query_ids, bank_ids,
                              row_weights, row_lse, col_lse, *fused)

    @staticmethod
    def backward(ctx, grad_output, *_):
        if grad_output is None:  # no gradient reached the loss (set_materialize_grads(False))
            return (None,) * 11
        saved = ctx.saved_tensors  # checks the version counters: in-place edits raise here
        with torch.no_grad():
            grads = FusedInfoNCE._input_gradients(ctx, grad_output, saved)
        grads = first_order_only(cast_gradients(grads, ctx.dtypes), ctx.spec.backend)
        return (*grads, None, None, None, None, None, None)

    @staticmethod
    def _input_gradients(ctx, grad_output, saved):
        spec = ctx.spec
        (query, key, bank, per_query, scale, targets, query_ids, bank_ids, row_weights, row_lse,
         col_lse, *fused) = saved
        key = query if ctx.shared_key else key
        if ctx.fused:
            grads = scaled_fused_gradients(fused, ctx.needs, grad_output)
        else:
            op = _prepare(spec, query, key, bank, per_query, scale, ctx.gram)
            y, beta = _product_keys(op, spec)
            ids = _product_ids(op, spec, targets, query_ids, bank_ids)
            g = reduction_weights(spec.reduction, query.shape[0], grad_output, op.alpha.dtype,
                                  row_weights).contiguous()
            # The backward needs s_{i,t_i} only where it is a candidate outside the product.
            positive = _positive_scores(op, targets) if _positive_in_extra(spec) else None
            if ctx.gram:
                grads = _gram_gradients(spec, op, targets, positive, beta, ids, row_lse, g,
                                        ctx.needs)
            else:
                grads = _gradients(spec, op, targets, positive, y, beta, ids, row_lse,
                                   _present(col_lse), g, None, ctx.needs)
        if ctx.shared_key:  # one tensor in both roles: its gradient is the sum of both
            dq, dkey = grads[:2]
            grads = [dkey if dq is None else dq if dkey is None else dq + dkey, None, *grads[2:]]
        return grads


def _fused(spec, query, key, bank, per_query, scale, targets, query_ids=None, bank_ids=None,
           row_weights=None):
    """The loss of one fused pass (see FusedInfoNCE)."""
    needs = requires_grad(query, key, bank, per_query, scale)
    # One tensor in the roles of query and key (NT-Xent's views, SupCon) goes in once: as two
    # inputs of one autograd.Function it would break the graph under torch.compile.
    key = None if key is query else key
    return FusedInfoNCE.apply(query, key, bank, per_query, scale, targets, query_ids, bank_ids,
                              row_weights, spec, needs)[0]


# ---------------------------------------------------------------------------------------------
# 3. Objectives
# ---------------------------------------------------------------------------------------------


def _accumulate(t):
    return t.double() if t.dtype == torch.float64 else t.float()


def _upcast_inputs(spec, *tensors):
    """(spec, tensors) for an objective whose inputs also feed host terms with autograd (DCLW,
    HCL, SupCon): low-precision inputs go in as ONE float32 copy each (the same object where
    one tensor plays two roles), so that the gradients of the fused pass and of the host terms
    are summed in float32 and cast once; a float16 sum of two large, cancelling parts would
    overflow. The kernels still read the original dtype (spec.kernel_dtype)."""
    first = tensors[0]
    if first.dtype not in (torch.float16, torch.bfloat16):
        return spec, tensors
    upcast = {}
    out = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        if id(t) not in upcast:
            upcast[id(t)] = t.float()
        out.append(upcast[id(t)])
    return replace(spec, kernel_dtype=first.dtype), tuple(out)


def positive_scores(query, key, targets, scale, normalize, eps):
    """s_p(i) = <q_i, k_t(i)> * scale (normalised first when ``normalize``), with autograd."""
    k = key if targets is None else key.index_select(0, targets)
    q, k = _accumulate(query), _accumulate(k)
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


def info_nce_loss(options, query, key, bank, per_query, scale, targets, query_ids=None,
                  bank_ids=None):
    """InfoNCE with the objective of ``options`` (plain, DCL, DCLW, HCL), reduced as
    options.reduction, in the accumulation dtype (float32 for half inputs: the public function
    casts it). bank (K, D) / per_query (N, K, D) negatives; scale = 1/temperature."""
    valid = None  # rows that keep a negative (None: every row does)
    over_negatives = options.decoupled or options.needs_host_terms
    if over_negatives and static_negative_count(options, key.shape[0], bank, per_query) == 0:
        return _no_candidate_loss(options, query, key, targets, scale)
    if over_negatives and query_ids is not None:
        valid = negative_counts(options, query.shape[0], key.shape[0], bank, per_query,
                                query_ids, bank_ids, query.device) > 0
    if not options.needs_host_terms:
        spec, weights = _over_rows(_loss_pass(options), valid, accumulate_dtype(query.dtype))
        return _fused(spec, query, key, bank, per_query, scale, targets, query_ids, bank_ids,
                      row_weights=weights)
    negatives, (query, key, bank, per_query) = _upcast_inputs(_negatives_pass(options), query,
                                                              key, bank, per_query)

    def negatives_lse(at_scale):
        lse = _negatives_lse(negatives, query, key, bank, per_query, at_scale, targets,
                             query_ids, bank_ids).to(positive.dtype)
        return _zero_outside(lse, valid)

    positive = positive_scores(query, key, targets, scale, options.normalize, options.eps)
    if options.dclw_sigma is not None:
        cosine = positive / scale.to(positive.dtype)
        weight = 2 - positive.shape[0] * torch.softmax(cosine / options.dclw_sigma, dim=0)
        loss = negatives_lse(scale) - weight * positive
    else:
        log_n = negative_counts(options, query.shape[0], key.shape[0], bank, per_query,
                                query_ids, bank_ids, query.device).to(positive.dtype).log()
        loss = _hard_negative_loss(options, negatives_lse, scale, positive,
                                   _zero_outside(log_n, valid))
    return reduce_loss(_zero_outside(loss, valid), options.reduction, valid)


def _negatives_lse(spec, query, key, bank, per_query, scale, targets, query_ids, bank_ids):
    """Per-row log-sum-exp over the negatives (spec: _negatives_pass), (N,). The kernels' id
    mask holds one id per row: with in-batch keys it masks each row's positive (row id t_i), so
    the bank entries of the query's own id (query_ids) go through a second product over the
    bank alone (row id query_ids_i), merged in log space: the same candidates as
    info_nce_reference and as the count of negative_counts."""
    if query_ids is None or bank is None or not spec.in_batch_negatives:
        return _fused(spec, query, key, bank, per_query, scale, targets, query_ids, bank_ids)
    over_bank = _fused(replace(spec, in_batch_negatives=False), query, key, bank, None, scale,
                       targets, query_ids, bank_ids)
    if key.shape[0] - 1 - int(spec.exclude_self) == 0:  # no in-batch negative
        return over_bank
    over_keys = _fused(spec, query, key, None, per_query, scale, targets)
    return torch.logaddexp(over_keys, over_bank.to(over_keys.dtype))


def _no_candidate_loss(options, query, key, targets, scale):
    """A DCL / HCL loss whose rows have no negative at all (e.g. N = 1): every row gives 0, none
    counts in the mean (so "mean" is 0 as well), and the gradient is 0, kept in the graph."""
    positive = positive_scores(query, key, targets, scale, options.normalize, options.eps)
    loss = torch.where(torch.zeros_like(positive, dtype=torch.bool), positive,
                       torch.zeros_like(positive))
    return reduce_loss(loss, options.reduction)


def _zero_outside(t, valid):
    """t where ``valid`` (rows with a negative), 0 elsewhere (None: every row is valid). Applied
    to every per-row term, so that the -inf of an empty row never reaches a gradient."""
    return t if valid is None else torch.where(valid, t, torch.zeros_like(t))


def _over_rows(spec, valid, dtype):
    """(spec, row weights) of a fused pass whose loss counts only the ``valid`` rows: a row
    without any candidate gives 0 and is left out of the mean (weights 1 / #valid for "mean",
    1 for "sum" and "none", 0 for the empty rows); (spec, None) when every row is valid."""
    if valid is None:
        return spec, None
    weights = valid.to(dtype)
    if spec.reduction == "mean":
        weights = weights / valid.sum().clamp_min(1)
        spec = replace(spec, reduction="sum")
    return spec, weights


def _hard_negative_loss(options, negatives_lse, scale, positive, log_n):
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


def _class_index(labels):
    """Dense class ids in [0, N) for int64 labels (N,), with static shapes (traceable): sort,
    then count the label changes. The same labels get the same id."""
    sorted_labels, order = labels.sort()
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    dense = torch.cumsum(starts.to(torch.int64), 0) - 1
    return torch.empty_like(dense).scatter_(0, order, dense)


def supcon_loss(features, labels, scale, *, normalize, reduction, backend, eps=1e-12):
    """SupCon L_out over features (R, D) with labels (R,); per-anchor losses reduced as
    ``reduction`` (mean over anchors that have a positive), in the accumulation dtype; see the
    module docstring."""
    # The denominator: lse over b != a (self excluded), without subtracting a positive. The
    # features are normalised once (normalized_rows) for it and for the positive term: one
    # (N, D) copy and one backward of the normalisation for both, where each did its own (on a
    # busy CPU every such pass is a parallel op that waits at a barrier for descheduled threads).
    denominator = _FusedPass(backend, in_batch_negatives=True, exclude_self=True, symmetric=False,
                             normalize=False, reduction="none" if reduction == "none" else
                             "sum", exclude_positive=False, subtract_positive=False, eps=eps)
    # One float32 copy of low-precision features feeds the host terms and the fused pass.
    denominator, (features,) = _upcast_inputs(denominator, features)
    if normalize:
        features = normalized_rows(features, eps, backend)
    cls = _class_index(labels)
    n = features.shape[0]
    counts = torch.zeros(n, dtype=torch.int64, device=features.device).index_add(
        0, cls, torch.ones_like(cls))
    class_sizes = counts[cls]
    pos_mean = supcon_positive_means(features, scale.to(features.dtype), cls, class_sizes,
                                     backend=backend)
    has_positive = class_sizes > 1
    if reduction == "none":
        lse = _fused(denominator, features, features, None, None, scale, None)
        loss = torch.where(has_positive, lse.to(features.dtype) - pos_mean,
                           torch.zeros_like(pos_mean))
        return _supcon_non_negative(loss, n)
    # A weighted sum keeps the fused kernels on their no-recompute path: w_a = 1 / #anchors with
    # a positive ("mean") or 1 ("sum") for those anchors, 0 for the others.
    weights = has_positive.to(features.dtype)
    if reduction == "mean":
        weights = weights / has_positive.sum().clamp_min(1)
    lse_sum = _fused(denominator, features, features, None, None, scale, None,
                     row_weights=weights)
    loss = lse_sum.to(features.dtype) - (weights * pos_mean).sum()
    return _supcon_non_negative(loss, n)


def _supcon_non_negative(loss, n):
    """SupCon's value is >= 0 (the lse over b != a bounds the mean over a's positives), and
    with two samples it is exactly s_ab - s_ab = 0: fix the value as _non_negative does, leaving
    the gradient as it is (a detached correction)."""
    return loss + (_non_negative(loss.detach(), n == 2) - loss.detach())
