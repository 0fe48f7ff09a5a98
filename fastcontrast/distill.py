"""The similarity-distillation op family (OpenCLIP's DistillClipLoss distillation term, CLIP-KD):
its registered kernel ops and its autograd, read top to bottom.

    s_ij   = <q^S_i, k^S_j> / tau_S          (student; unit rows when normalize)
    t_ij   = <q^T_i, k^T_j> / tau_T          (teacher; its own feature dim; no gradient)
    p^T_ij = softmax_j(t_i.)_j,   lse^S_i = logsumexp_j s_ij
    loss_i = sum_j p^T_ij (lse^S_i - s_ij) = lse^S_i - w_i,   w_i = sum_j p^T_ij s_ij
           = H(p^T_i, softmax(s_i.))  (cross-entropy; the KL of CLIP-KD plus the teacher entropy)
    symmetric (N == M): also the column (key -> query) direction, loss_i = (row_i + col_i) / 2

Gradient: d loss_i / d s_ij = P^S_ij - p^T_ij, so with row weights g_i (and column weights c_j)

    G_ij = g_i (P^S_ij - p^T_ij) + c_j (Pc^S_ij - pc^T_ij)       (Pc: softmaxes over i)
    d q^S_i = sum_j G_ij k^S_j / tau_S,  d k^S_j = sum_i G_ij q^S_i / tau_S,
    d (1/tau_S) = sum_ij G_ij <q^S_i, k^S_j>

1. Kernel ops (torch.library, namespace ``fastcontrast``, with fake kernels), run by the backend
   named in the call (kernels/distill.py, csrc/cpu/distill.cpp, fastcontrast/_distill_torch.py):
       distill_forward(sq, sk, tq, tk, s_scale, t_scale, with_cols) -> (row stats (3, N),
           col stats (3, M) or (0,)): lse^S, lse^T, w per row (and per column)
       distill_backward(..., row_stats, row_grad, col_stats, col_grad, need_gq, need_gk,
           row_student_grad=None, col_student_grad=None)
           -> (gq = G k^S, gk = G^T q^S), recomputing both score tiles
       distill_forward_with_grad(..., row_grad, need_gq, need_gk, row_student_grad=None)
           -> (row stats, gq, gk) of the row direction in one pass (backends that fuse it: a
           reduced one-direction loss costs four N x M x D products instead of six)
   ``row_student_grad`` a (``col_student_grad`` ca) weighs the student's softmax apart from the
   teacher's, G_ij = a_i P^S_ij - g_i p^T_ij + ca_j Pc^S_ij - c_j pc^T_ij; None means a = g
   (ca = c), the distillation loss alone. A loss whose other terms share the student's
   log-sum-exps adds their weights to a: OpenCLIP's DistillClipLoss, contrastive + distillation,
   in one pass (fastcontrast/distill_clip.py).
   Both compute the student and the teacher scores tile by tile: memory O(N + M), never an
   N x M matrix.
2. ``FusedDistill``: the autograd.Function on those ops (on the normalised features; the
   normalisation's own backward is plain autograd, O((N + M) D)).
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from ._host import (accumulate_dtype, cast_gradients, first_order_only, or_empty, reduce_loss,
                    reduction_weights, requires_grad, rowwise_dot, scaled_fused_gradients)
from ._host_threads import serial_host_ops

__all__ = ["distill_fused_loss", "distill_forward", "distill_backward",
           "distill_forward_with_grad"]

# ---------------------------------------------------------------------------------------------
# 1. Kernel ops
# ---------------------------------------------------------------------------------------------


def _kernel_args(backend, features, s_scale, t_scale):
    """(kernels, contiguous features, scales): the C++ kernels take the scales as numbers (CPU
    tensors, so reading them costs nothing), the others as 0-dim tensors."""
    impl = backends.kernels("distill", backend)
    if backend == "cpu":
        s_scale, t_scale = float(s_scale), float(t_scale)
    return impl, [t.contiguous() for t in features], s_scale, t_scale


@torch.library.custom_op("fastcontrast::distill_forward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def distill_forward(sq: Tensor, sk: Tensor, tq: Tensor, tk: Tensor, s_scale: Tensor,
                    t_scale: Tensor, with_cols: bool, backend: str) -> Tuple[Tensor, Tensor]:
    """(row stats (3, N), col stats (3, M) or (0,)): lse^S, lse^T, sum_j p^T_ij s_ij."""
    impl, features, s_scale, t_scale = _kernel_args(backend, (sq, sk, tq, tk), s_scale, t_scale)
    rows, cols = impl.distill_forward(*features, s_scale, t_scale, with_cols=with_cols)
    return rows, or_empty(cols, rows)


@distill_forward.register_fake
def _distill_forward_fake(sq, sk, tq, tk, s_scale, t_scale, with_cols, backend):
    dtype = backends.PROPERTIES[backend].output_dtype(sq.dtype)
    return (sq.new_empty((3, sq.shape[0]), dtype=dtype),
            sq.new_empty((3, sk.shape[0]) if with_cols else (0,), dtype=dtype))


@torch.library.custom_op("fastcontrast::distill_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def distill_backward(sq: Tensor, sk: Tensor, tq: Tensor, tk: Tensor, s_scale: Tensor,
                     t_scale: Tensor, row_stats: Tensor, row_grad: Tensor,
                     col_stats: Optional[Tensor], col_grad: Optional[Tensor], need_gq: bool,
                     need_gk: bool, backend: str, row_student_grad: Optional[Tensor] = None,
                     col_student_grad: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(gq (N, D) or (0,), gk (M, D) or (0,)), recomputing the score tiles; the student
    weights default to row_grad / col_grad."""
    impl, features, s_scale, t_scale = _kernel_args(backend, (sq, sk, tq, tk), s_scale, t_scale)
    cols = [None if t is None else t.contiguous() for t in (col_stats, col_grad)]
    student = _student_weights(row_student_grad=row_student_grad,
                               col_student_grad=col_student_grad)
    gq, gk = impl.distill_backward(*features, s_scale, t_scale, row_stats.contiguous(),
                                   row_grad.contiguous(), *cols, need_gq=need_gq,
                                   need_gk=need_gk, **student)
    return or_empty(gq, row_stats), or_empty(gk, row_stats)


def _student_weights(**weights):
    """The student weights given (contiguous), as keywords: none when absent, so a backend
    is called as before on the distillation-only path."""
    return {k: v.contiguous() for k, v in weights.items() if v is not None}


@distill_backward.register_fake
def _distill_backward_fake(sq, sk, tq, tk, s_scale, t_scale, row_stats, row_grad, col_stats,
                           col_grad, need_gq, need_gk, backend, row_student_grad=None,
                           col_student_grad=None):
    dtype = backends.PROPERTIES[backend].output_dtype(sq.dtype)
    return (sq.new_empty(sq.shape if need_gq else (0,), dtype=dtype),
            sq.new_empty(sk.shape if need_gk else (0,), dtype=dtype))


@torch.library.custom_op("fastcontrast::distill_forward_with_grad", mutates_args=(),
                         device_types=("cpu", "cuda"))
def distill_forward_with_grad(sq: Tensor, sk: Tensor, tq: Tensor, tk: Tensor, s_scale: Tensor,
                              t_scale: Tensor, row_grad: Tensor, need_gq: bool, need_gk: bool,
                              backend: str, row_student_grad: Optional[Tensor] = None
                              ) -> Tuple[Tensor, Tensor, Tensor]:
    """(row stats (3, N), gq or (0,), gk or (0,)) of the row direction, no recompute."""
    impl, features, s_scale, t_scale = _kernel_args(backend, (sq, sk, tq, tk), s_scale, t_scale)
    rows, gq, gk = impl.distill_forward_with_grad(
        *features, s_scale, t_scale, row_grad.contiguous(), need_gq=need_gq, need_gk=need_gk,
        **_student_weights(row_student_grad=row_student_grad))
    return rows, or_empty(gq, rows), or_empty(gk, rows)


@distill_forward_with_grad.register_fake
def _distill_forward_with_grad_fake(sq, sk, tq, tk, s_scale, t_scale, row_grad, need_gq,
                                    need_gk, backend, row_student_grad=None):
    rows, _ = _distill_forward_fake(sq, sk, tq, tk, s_scale, t_scale, False, backend)
    return (rows, *_distill_backward_fake(sq, sk, tq, tk, s_scale, t_scale, rows, row_grad,
                                          None, None, need_gq, need_gk, backend))


# ---------------------------------------------------------------------------------------------
# 2. The autograd.Function
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    backend: str
    symmetric: bool
    reduction: str
    needs: tuple  # requires-grad of (student query, student key, student scale)

    @property
    def fused(self):
        """The backend forms the gradient in the forward pass (one direction, reduced)."""
        return (backends.PROPERTIES[self.backend].fuses_gradient and not self.symmetric
                and self.reduction != "none" and any(self.needs))


def _operands(backend, sq, sk, tq, tk, s_scale, t_scale):
    """Features in the backend's compute dtype, scales as detached 0-dim tensors of the
    accumulation dtype."""
    cdt = backends.PROPERTIES[backend].compute_dtype(sq.dtype)
    acc = accumulate_dtype(cdt)
    features = [t.to(cdt).contiguous() for t in (sq, sk, tq, tk)]
    return (*features, s_scale.detach().to(acc), t_scale.detach().to(acc))


def _weights(spec, grad_output, n, m, dtype):
    """(row weights g (N,), column weights c (M,) or None): d reduced loss / d row_i (col_j)."""
    half = 0.5 if spec.symmetric else 1.0
    g = (reduction_weights(spec.reduction, n, grad_output, dtype) * half).contiguous()
    if not spec.symmetric:
        return g, None
    return g, (reduction_weights(spec.reduction, m, grad_output, dtype) * half).contiguous()


def _input_grads(needs, x, gq, gk):
    """(d sq, d sk, d s_scale) from the kernels' gq, gk (None where not needed); d s_scale =
    sum_i <gq_i, sq_i>, before gq is scaled in place."""
    need_q, need_k, need_scale = needs
    scale = x[4]
    d_scale = rowwise_dot(x[0], gq).to(scale.dtype).sum() if need_scale else None
    d_q = gq.mul_(scale.to(gq.dtype)) if need_q else None
    d_k = gk.mul_(scale.to(gk.dtype)) if need_k else None
    return [d_q, d_k, d_scale]


class FusedDistill(torch.autograd.Function):
    """apply(sq, sk, tq, tk, s_scale, t_scale, spec) -> (loss, *fused gradients): the
    distillation loss of the (already normalised) student and teacher features; gradients to
    sq, sk, s_scale only. A fusing backend returns the gradients for grad_output = 1 with the
    loss (spec.fused) and the backward scales them; otherwise the backward recomputes."""

    @staticmethod
    def forward(sq, sk, tq, tk, s_scale, t_scale, spec):
        with serial_host_ops(spec.backend):
            x = _operands(spec.backend, sq, sk, tq, tk, s_scale, t_scale)
            need_q, need_k, need_scale = spec.needs
            fused = [None] * 3
            if spec.fused:
                g, _ = _weights(spec, x[4].new_tensor(1.0), sq.shape[0], sk.shape[0], x[4].dtype)
                out_dtype = backends.PROPERTIES[spec.backend].output_dtype(x[0].dtype)
                rows, gq, gk = distill_forward_with_grad(*x, g.to(out_dtype),
                                                         need_q or need_scale, need_k,
                                                         spec.backend)
                cols = rows.new_empty(0)
                fused = _input_grads(spec.needs, x, gq, gk)
            else:
                rows, cols = distill_forward(*x, spec.symmetric, spec.backend)
            loss = rows[0] - rows[2]
            if spec.symmetric:
                loss = 0.5 * (loss + (cols[0] - cols[2]))
            out = reduce_loss(loss.to(accumulate_dtype(loss.dtype)), spec.reduction)
        return (out, rows, cols, *[or_empty(t, out) for t in fused])

    @staticmethod
    def setup_context(ctx, inputs, output):
        sq, sk, tq, tk, s_scale, t_scale, spec = inputs
        ctx.spec = spec
        ctx.dtypes = [sq.dtype, sk.dtype, s_scale.dtype]
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(sq, sk, tq, tk, s_scale, t_scale, *output[1:])

    @staticmethod
    def backward(ctx, grad_output, *_):
        spec = ctx.spec
        sq, sk, tq, tk, s_scale, t_scale, rows, cols, *fused = ctx.saved_tensors
        with torch.no_grad(), serial_host_ops(spec.backend):
            if spec.fused:
                grads = scaled_fused_gradients(fused, spec.needs, grad_output)
            else:
                x = _operands(spec.backend, sq, sk, tq, tk, s_scale, t_scale)
                g, c = _weights(spec, grad_output, sq.shape[0], sk.shape[0], rows.dtype)
                need_q, need_k, need_scale = spec.needs
                gq, gk = distill_backward(*x, rows, g, cols if spec.symmetric else None, c,
                                          need_q or need_scale, need_k, spec.backend)
                grads = _input_grads(spec.needs, x, gq, gk)
        grads = first_order_only(cast_gradients(grads, ctx.dtypes), spec.backend)
        return grads[0], grads[1], None, None, grads[2], None, None


def _unit(t, normalize, eps=1e-12):
    return F.normalize(t, dim=-1, eps=eps) if normalize else t


def distill_fused_loss(student_query, student_key, teacher_query, teacher_key, s_scale, t_scale,
                       *, symmetric, normalize, reduction, backend):
    """The distillation loss on a fused backend (validated inputs; scales = 1 / temperatures
    as 0-dim tensors), in the accumulation dtype. The teacher is detached: its inputs and
    t_scale get no gradient. Normalisation runs in the accumulation dtype with plain autograd."""
    acc = accumulate_dtype(student_query.dtype)
    with torch.no_grad():
        tq = _unit(teacher_query.to(acc), normalize)
        tk = _unit(teacher_key.to(acc), normalize)
    sq = _unit(student_query.to(acc), normalize)
    sk = _unit(student_key.to(acc), normalize)
    if backends.PROPERTIES[backend].compute_dtype(student_query.dtype) != acc:
        # Triton computes in half precision: hand it the normalised rows in the input dtype.
        sq, sk = sq.to(student_query.dtype), sk.to(student_query.dtype)
        tq, tk = tq.to(student_query.dtype), tk.to(student_query.dtype)
    needs = requires_grad(sq, sk, s_scale)
    spec = _Spec(backend, symmetric, reduction, needs)
    return FusedDistill.apply(sq, sk, tq, tk, s_scale, t_scale.detach(), spec)[0]
