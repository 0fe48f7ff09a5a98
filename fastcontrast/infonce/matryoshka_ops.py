"""The Matryoshka kernel ops, registered with torch.library (namespace ``fastcontrast``), with
fake kernels and autograd: the log-sum-exps of every leading-dimension prefix of one product,
in one pass over the key tiles. With prefix bounds 0 = b_0 < b_1 < ... < b_P (chunk c: the
dimensions b_c .. b_{c+1}):

    s^p_ij = alpha_pi beta_pj sum_{c <= p} <x_i[chunk c], y_j[chunk c]>,
             masked (-inf) where exclude_diag and j == i
    matryoshka_lse_forward   -> row_lse (P, N) = logsumexp_j s^p_ij, col_lse (P, M) (optional)
    matryoshka_lse_backward  -> dS^p_ij = g_pi exp(s^p_ij - row_lse_pi)
                                          + c_pj exp(s^p_ij - col_lse_pj),
                                dx[:, chunk c] = G_c y[:, chunk c], dy[:, chunk c] = G_c^T x[...],
                                G_c = sum_{p >= c} alpha_p beta_p dS^p (one product per chunk),
                                dalpha_pi = sum_j dS^p_ij beta_pj S^p_ij, dbeta likewise
    matryoshka_lse_forward_with_grad -> row_lse and the gradients of the backward for a row
                                gradient known up front (a reduced loss), in one pass (backends
                                that fuse it: cpu); the backward scales them when the upstream
                                gradient is a multiple of that one, else recomputes

The prefix scores are partial sums of the same chunk products, so the P losses cost one product
of the inputs, not P. alpha / beta carry the per-prefix inverse norms and the scale (the host
differentiates them: fastcontrast/infonce/matryoshka.py). The per-device kernel is the backend's
"matryoshka" family (fastcontrast.backends.kernels): fastcontrast/_torch_matryoshka.py (torch),
csrc/cpu/matryoshka.cpp (cpu), kernels/matryoshka.py (triton)."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .._host import or_empty
from .._host_threads import serial_host_ops

__all__ = ["matryoshka_lse", "matryoshka_lse_fused"]


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


@torch.library.custom_op("fastcontrast::matryoshka_lse_forward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def matryoshka_lse_forward(x: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, bounds: List[int],
                           exclude_diag: bool, with_col_lse: bool,
                           backend: str) -> Tuple[Tensor, Tensor]:
    """(row_lse (P, N), col_lse (P, M), or (0,) without ``with_col_lse``)."""
    x, y, alpha, beta = _contiguous(x, y, alpha, beta)
    row_lse, col_lse = backends.kernels("matryoshka", backend).matryoshka_lse_forward(
        x, y, alpha, beta, list(bounds), exclude_diag=exclude_diag, with_col_lse=with_col_lse)
    return row_lse, or_empty(col_lse, row_lse)


@matryoshka_lse_forward.register_fake
def _forward_fake(x, y, alpha, beta, bounds, exclude_diag, with_col_lse, backend):
    dtype = backends.PROPERTIES[backend].output_dtype(x.dtype)
    p = len(bounds) - 1
    return (x.new_empty(p, x.shape[0], dtype=dtype),
            x.new_empty((p, y.shape[0]) if with_col_lse else (0,), dtype=dtype))


@torch.library.custom_op("fastcontrast::matryoshka_lse_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def matryoshka_lse_backward(x: Tensor, y: Tensor, alpha: Tensor, beta: Tensor, bounds: List[int],
                            row_lse: Tensor, row_grad: Tensor, col_lse: Optional[Tensor],
                            col_grad: Optional[Tensor], exclude_diag: bool,
                            backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx (N, D), dy (M, D), dalpha (P, N), dbeta (P, M)); recomputes the tiles."""
    args = _contiguous(x, y, alpha, beta, row_lse, row_grad, col_lse, col_grad)
    x, y, alpha, beta, row_lse, row_grad, col_lse, col_grad = args
    return tuple(backends.kernels("matryoshka", backend).matryoshka_lse_backward(
        x, y, alpha, beta, list(bounds), row_lse, row_grad, col_lse, col_grad,
        exclude_diag=exclude_diag))


@matryoshka_lse_backward.register_fake
def _backward_fake(x, y, alpha, beta, bounds, row_lse, row_grad, col_lse, col_grad, exclude_diag,
                   backend):
    dtype = backends.PROPERTIES[backend].output_dtype(x.dtype)
    return (x.new_empty(x.shape, dtype=dtype), x.new_empty(y.shape, dtype=dtype),
            x.new_empty(alpha.shape, dtype=dtype), x.new_empty(beta.shape, dtype=dtype))


def _setup_context(ctx, inputs, output):
    x, y, alpha, beta, bounds, exclude_diag, with_col_lse, backend = inputs
    row_lse, col_lse = output
    ctx.save_for_backward(x, y, alpha, beta, row_lse, col_lse)
    ctx.options = (list(bounds), exclude_diag, with_col_lse, backend)
    ctx.set_materialize_grads(False)


def _backward(ctx, row_grad, col_grad):
    x, y, alpha, beta, row_lse, col_lse = ctx.saved_tensors
    bounds, exclude_diag, with_col_lse, backend = ctx.options
    if row_grad is None and col_grad is None:
        return (None,) * 8
    row_grad = torch.zeros_like(row_lse) if row_grad is None else row_grad.to(row_lse.dtype)
    if with_col_lse and col_grad is not None:
        col_grad = col_grad.to(col_lse.dtype)
    else:  # no column term: its lse and gradient stay out of the kernels
        col_lse, col_grad = None, None
    dx, dy, dalpha, dbeta = matryoshka_lse_backward(x, y, alpha, beta, bounds, row_lse,
                                                    row_grad, col_lse, col_grad, exclude_diag,
                                                    backend)
    return (dx.to(x.dtype), dy.to(y.dtype), dalpha.to(alpha.dtype), dbeta.to(beta.dtype),
            None, None, None, None)


matryoshka_lse_forward.register_autograd(_backward, setup_context=_setup_context)


def matryoshka_lse(x, y, alpha, beta, bounds, *, exclude_diag, with_col_lse, backend):
    """(row_lse (P, N), col_lse (P, M) or None), differentiable in x, y, alpha and beta."""
    row_lse, col_lse = matryoshka_lse_forward(x, y, alpha, beta, list(bounds), exclude_diag,
                                              with_col_lse, backend)
    return row_lse, (col_lse if with_col_lse else None)


@torch.library.custom_op("fastcontrast::matryoshka_lse_forward_with_grad", mutates_args=(),
                         device_types=("cpu", "cuda"))
def matryoshka_lse_forward_with_grad(x: Tensor, y: Tensor, alpha: Tensor, beta: Tensor,
                                     bounds: List[int], row_grad: Tensor, exclude_diag: bool,
                                     backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(row_lse (P, N), dx, dy, dalpha, dbeta) for the row gradient ``row_grad`` (P, N)."""
    x, y, alpha, beta, row_grad = _contiguous(x, y, alpha, beta, row_grad)
    return tuple(backends.kernels("matryoshka", backend).matryoshka_lse_forward_with_grad(
        x, y, alpha, beta, list(bounds), row_grad, exclude_diag=exclude_diag))


@matryoshka_lse_forward_with_grad.register_fake
def _forward_with_grad_fake(x, y, alpha, beta, bounds, row_grad, exclude_diag, backend):
    dtype = backends.PROPERTIES[backend].output_dtype(x.dtype)
    return (x.new_empty(alpha.shape, dtype=dtype),
            *_backward_fake(x, y, alpha, beta, bounds, None, None, None, None, exclude_diag,
                            backend))


def _setup_fused(ctx, inputs, output):
    x, y, alpha, beta, bounds, row_grad, exclude_diag, backend = inputs
    row_lse, *grads = output
    ctx.save_for_backward(x, y, alpha, beta, row_grad, row_lse, *grads)
    ctx.options = (list(bounds), exclude_diag, backend)
    ctx.mark_non_differentiable(*grads)
    ctx.set_materialize_grads(False)


def _multiple_of(grad, pattern):
    """c with grad == c * pattern (to a relative 1e-6 of grad), or None: the forward's gradients
    are those of ``pattern``, so c scales them."""
    k = pattern.abs().argmax()
    c = grad.flatten()[k] / pattern.flatten()[k]
    scale = grad.abs().max()
    ok = bool(torch.isfinite(c)) and bool(((grad - c * pattern).abs() <= 1e-6 * scale).all())
    return c if ok else None


def _traced(t):
    """Whether ``t``'s values are unknown (torch.compile, AOT dispatch: fake tensors), so that
    no branch may depend on them."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or is_fake(t)


def _fused_backward(ctx, grad_lse, *_):
    x, y, alpha, beta, row_grad, row_lse, *grads = ctx.saved_tensors
    bounds, exclude_diag, backend = ctx.options
    if grad_lse is None:
        return (None,) * 8
    grad_lse = grad_lse.to(row_lse.dtype)
    c = None if _traced(grad_lse) else _multiple_of(grad_lse, row_grad)
    if c is None:  # not the gradient the forward assumed (or unknown while traced): recompute
        grads = matryoshka_lse_backward(x, y, alpha, beta, bounds, row_lse, grad_lse, None, None,
                                        exclude_diag, backend)
    else:
        with serial_host_ops(backend):
            grads = [g * c for g in grads]
    return (*[g.to(t.dtype) for g, t in zip(grads, (x, y, alpha, beta))], None, None, None, None)


matryoshka_lse_forward_with_grad.register_autograd(_fused_backward, setup_context=_setup_fused)


def matryoshka_lse_fused(x, y, alpha, beta, bounds, row_grad, *, exclude_diag, backend):
    """row_lse (P, N), differentiable in x, y, alpha and beta; its gradients are formed in the
    forward pass for the upstream gradient ``row_grad`` (or a multiple of it)."""
    return matryoshka_lse_forward_with_grad(x, y, alpha, beta, list(bounds), row_grad,
                                            exclude_diag, backend)[0]
