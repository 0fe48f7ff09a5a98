"""Matryoshka InfoNCE (Kusupati et al. 2022; sentence-transformers' MatryoshkaLoss): the weighted
sum over leading-dimension prefixes d_1 < ... < d_P of the loss on the first d_p features,

    loss = sum_p w_p loss(q[:, :d_p], k[:, :d_p])        (w_p = 1 by default)

each prefix L2-normalised on its own when the loss normalises (info_nce, nt_xent; clip_loss
takes the leading d_p dimensions of the features as given). Per row and prefix,

    s^p_ij = scale <q_i[:d_p], k_j[:d_p]> / (|q_i[:d_p]| |k_j[:d_p]|),
    loss^p_i = lse_{j in C(i)} s^p_ij - s^p_{i,t_i}    (symmetric: (row + col) / 2 - s^p_ii)

The P log-sum-exps come from ONE pass over the key tiles (matryoshka_ops.py): s^p is a partial
sum over D chunks of the same products, scaled by the per-prefix inverse norms, which are
computed up front here in O((N + M) D) from cumulative chunk sums of squares, as are the
positives. Their gradients go through autograd, on the calling thread on cpu (as the forward's
host passes: serial_host_graph); the kernels' backward folds the prefixes' weights into one
product per D chunk.

Supported with: targets, exclude_self (nt_xent), symmetric (clip_loss), normalize, a shared
bank of negatives (without ids), every reduction and a tensor temperature. The other options
raise NotImplementedError naming the combination."""
import math
import numbers

import torch

from .. import backends
from .._host import accumulate_dtype, non_negative_value, reduce_loss
from .._host_threads import serial_host_graph
from ..reference import info_nce_reference
from .matryoshka_ops import matryoshka_lse, matryoshka_lse_fused

__all__ = ["matryoshka_args", "matryoshka_unsupported", "matryoshka_info_nce"]


def matryoshka_args(dims, weights, feature_dim):
    """(dims, weights) as tuples of ints / floats: dims a non-empty, strictly increasing sequence
    of positive ints, the last <= the feature dimension D; weights None (ones) or as many finite
    numbers. ((), ()) for dims None (no Matryoshka)."""
    if dims is None:
        if weights is not None:
            raise ValueError("matryoshka_weights needs matryoshka_dims, got "
                             "matryoshka_dims=None")
        return (), ()
    if isinstance(dims, (str, bytes, torch.Tensor)) or not hasattr(dims, "__len__"):
        raise TypeError(f"matryoshka_dims must be a sequence of ints, got {type(dims).__name__}")
    dims = tuple(dims)
    if not dims:
        raise ValueError("matryoshka_dims must hold at least one dimension, got ()")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"matryoshka_dims must hold ints, got {d!r} in {dims}")
    dims = tuple(int(d) for d in dims)
    if dims[0] <= 0:
        raise ValueError(f"matryoshka_dims must be positive, got {dims}")
    if any(b <= a for a, b in zip(dims, dims[1:])):
        raise ValueError(f"matryoshka_dims must be strictly increasing, got {dims}")
    if dims[-1] > feature_dim:
        raise ValueError(f"matryoshka_dims must not exceed the feature dimension D = "
                         f"{feature_dim}, got {dims}")
    if weights is None:
        return dims, (1.0,) * len(dims)
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__"):
        raise TypeError(f"matryoshka_weights must be a sequence of numbers, got "
                        f"{type(weights).__name__}")
    weights = tuple(weights)
    if len(weights) != len(dims):
        raise ValueError(f"matryoshka_weights must have one weight per dimension of "
                         f"matryoshka_dims ({len(dims)}), got {len(weights)}")
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"matryoshka_weights must be finite numbers, got {weights}")
    return dims, tuple(float(w) for w in weights)


def matryoshka_unsupported(options, negatives, query_ids, labels):
    """NotImplementedError naming an option that Matryoshka does not combine with, or None."""
    names = []
    if negatives is not None and negatives.dim() == 3:
        names.append("per-query negatives (N, K, D)")
    if query_ids is not None:
        names.append("query_ids / negative_ids")
    if not options.in_batch_negatives:
        names.append("in_batch_negatives=False (moco_loss)")
    if options.decoupled or options.needs_host_terms:
        names.append("decoupled / dclw_sigma / hcl_beta / hcl_tau_plus")
    if options.label_smoothing:
        names.append("label_smoothing")
    if labels[0] is not None:
        names.append("query_labels / key_labels (labels)")
    if not names:
        return None
    return NotImplementedError(f"matryoshka_dims cannot be combined with {', '.join(names)} "
                               f"yet; call the loss once per prefix instead")


def _reference(options, query, key, negatives, temperature, targets):
    """The oracle: literally the weighted sum of the separate per-prefix losses."""
    total = 0
    for d, w in zip(options.matryoshka_dims, options.matryoshka_weights):
        def cut(t):
            return None if t is None else t[..., :d]
        total = total + w * info_nce_reference(
            cut(query), cut(key), cut(negatives), temperature=temperature,
            normalize=options.normalize, targets=targets,
            in_batch_negatives=options.in_batch_negatives, exclude_self=options.exclude_self,
            symmetric=options.symmetric, reduction=options.reduction)
    return total


def _chunk_sums(a, b, bounds):
    """(P, R): sum over dimensions < b_{p+1} of a * b, row by row (cumulative chunk sums).

    One product split into the chunks (and the tail past b_P): the backward concatenates the
    chunks' gradients once, where a slice per chunk cost a zero-filled (R, D) gradient per chunk
    and operand and their sum (most of the host time of the CPU loss at N = 8192)."""
    widths = [hi - lo for lo, hi in zip(bounds, bounds[1:])]
    tail = a.shape[1] - bounds[-1]
    parts = (a * b).split(widths + ([tail] if tail else []), dim=1)
    return torch.stack([part.sum(dim=1) for part in parts[:len(widths)]]).cumsum(dim=0)


def _inverse_norms(z, bounds, eps):
    """(P, R): 1 / max(|z_i[:b_{p+1}]|, eps), F.normalize's rule per prefix."""
    return _chunk_sums(z, z, bounds).sqrt().clamp_min(eps).reciprocal()


def _fused_row_gradient(options, n, alpha, tensors):
    """The row gradient (P, N) of the loss with respect to row_lse where the backend forms the
    gradient in the forward pass (a reduced, one-directional loss that needs a gradient, eager):
    w_p / N for "mean", w_p for "sum"; else None."""
    properties = backends.PROPERTIES[options.backend]
    wanted = torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
    # Under torch.compile the plain ops: the fused op's backward reads the upstream gradient's
    # values (is it a multiple of the assumed one?), which a traced graph cannot.
    if (not properties.fuses_gradient or options.reduction == "none" or options.symmetric
            or not wanted or torch.compiler.is_compiling()):
        return None
    weights = alpha.new_tensor(options.matryoshka_weights)
    if options.reduction == "mean":
        weights = weights / n
    return weights.unsqueeze(1).expand(-1, n).contiguous()


def _fused(options, query, key, bank, scale, targets):
    """Per-row Matryoshka loss sum_p w_p loss^p_i (N,) of the fused ops, with autograd."""
    backend = options.backend
    acc = accumulate_dtype(query.dtype)
    compute = backends.PROPERTIES[backend].compute_dtype(query.dtype)
    bounds = (0, *options.matryoshka_dims)
    shared = key is query and bank is None
    keys = key if bank is None else torch.cat([key, bank])
    q_acc = query.to(acc)
    k_acc = q_acc if shared else keys.to(acc)
    if options.normalize:
        inv_q = _inverse_norms(q_acc, bounds, options.eps)
        inv_k = inv_q if shared else _inverse_norms(k_acc, bounds, options.eps)
    else:
        inv_q = q_acc.new_ones(len(bounds) - 1, query.shape[0])
        inv_k = k_acc.new_ones(len(bounds) - 1, keys.shape[0])
    alpha = inv_q * scale.to(acc)
    x = query.to(compute)
    y = x if shared else keys.to(compute)
    fused_pass = _fused_row_gradient(options, query.shape[0], alpha, (query, key, bank, scale))
    if fused_pass is not None:
        row_lse, col_lse = matryoshka_lse_fused(x, y, alpha, inv_k, bounds, fused_pass,
                                                exclude_diag=options.exclude_self,
                                                backend=backend), None
    else:
        row_lse, col_lse = matryoshka_lse(x, y, alpha, inv_k, bounds,
                                          exclude_diag=options.exclude_self,
                                          with_col_lse=options.symmetric, backend=backend)
    n = query.shape[0]
    if targets is not None:
        positive_key, positive_beta = k_acc.index_select(0, targets), inv_k[:, targets]
    elif k_acc.shape[0] == n:  # no slice: its backward would be a zero-filled (M, D) gradient
        positive_key, positive_beta = k_acc, inv_k
    else:
        positive_key, positive_beta = k_acc[:n], inv_k[:, :n]
    positive = alpha * positive_beta * _chunk_sums(q_acc, positive_key, bounds)
    lse = row_lse if col_lse is None else 0.5 * (row_lse + col_lse)
    loss = lse.to(acc) - positive
    candidates = keys.shape[0] - int(options.exclude_self)
    if candidates == 1:  # the positive alone: s - s, exactly 0 (NaN stays NaN)
        loss = loss * 0
    else:  # >= 0 as its value is: the lse and the positive are rounded apart
        loss = non_negative_value(loss)
    weights = loss.new_tensor(options.matryoshka_weights).unsqueeze(1)
    return (weights * loss).sum(dim=0)


def matryoshka_info_nce(options, query, key, negatives, temperature, scale, targets,
                        query_ids=None, labels=(None, None)):
    """The Matryoshka loss of the module docstring for info_nce's validated call, reduced as
    options.reduction (the oracle for backend "reference")."""
    error = matryoshka_unsupported(options, negatives, query_ids, labels)
    if error is not None:
        raise error
    if options.backend == "reference":
        return _reference(options, query, key, negatives, temperature, targets)
    def loss(query, key, negatives, scale):
        return reduce_loss(_fused(options, query, key, negatives, scale, targets),
                           options.reduction)

    # The host passes and their gradients on this thread (busy CPU), the kernels on every one.
    return serial_host_graph(loss, options.backend, query, key, negatives, scale)
