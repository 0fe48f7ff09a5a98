"""OpenCLIP's DistillClipLoss, both of its terms, in one fused pass over the score tiles.

    s_ij = logit_scale <x_i, y_j>               (student image x_i, text y_j; N x N)
    t_ij = teacher_logit_scale <x^T_i, y^T_j>   (teacher; its own feature dim; no gradient)
    lse^S_i = logsumexp_j s_ij,  clse^S_j = logsumexp_i s_ij   (and the teacher's likewise)
    contrastive_i = ((lse^S_i - s_ii) + (clse^S_i - s_ii)) / 2                  (CLIP loss)
    distill_i     = ((lse^S_i - w_i) + (clse^S_i - cw_i)) / 2,
                    w_i = sum_j softmax_j(t_i.)_j s_ij,  cw_j = sum_i softmax_i(t_.j)_i s_ij

Both terms share the student's log-sum-exps, so the distillation op's forward with its column
statistics (fastcontrast/distill.py: lse^S, lse^T, w per row and per column) gives both; s_ii
is a row-wise dot, O(N D). With upstream weights a_i (contrastive, row i), g_i (distillation),
and the same per column (symmetric: the halves of the reduction's weights),

    d / d s_ij = (a_i + g_i) P^S_ij - g_i p^T_ij + (a_j + g_j) Pc^S_ij - g_j pc^T_ij
                 - 2 a_i [i == j]

so one distill_backward with the student weights a + g (its row_student_grad /
col_student_grad) forms the tile part, and the diagonal part, -2 a_i on s_ii, is added on the
host: gq_i -= 2 a_i y_i, gk_i -= 2 a_i x_i (O(N D)). Against clip_loss + distill_info_nce this
saves the contrastive loss's own pass over the student tiles: six N x N x D products in all
(forward: student and teacher tiles; backward: both again, and the two gradient products).
"""
import torch

from ._host import (accumulate_dtype, cast_gradients, first_order_only, reduce_loss,
                    reduction_weights, requires_grad, rowwise_dot)
from ._host_threads import serial_host_ops
from .distill import _input_grads, _operands, distill_backward, distill_forward

__all__ = ["distill_clip_fused_loss", "FusedDistillClip"]


def _row_losses(x, y, scale, rows, cols):
    """(contrastive (N,), distillation (N,)) per row from the stats, in the accumulation dtype."""
    acc = accumulate_dtype(rows.dtype)
    rows, cols = rows.to(acc), cols.to(acc)
    diagonal = rowwise_dot(x, y).to(acc) * scale.to(acc)
    contrastive = 0.5 * ((rows[0] - diagonal) + (cols[0] - diagonal))
    distill = 0.5 * ((rows[0] - rows[2]) + (cols[0] - cols[2]))
    return contrastive, distill


def _upstream(reduction, n, grad, dtype):
    """Half the reduction's weights of one output (its two directions share them; autograd
    hands zeros for an output that got no gradient)."""
    return (reduction_weights(reduction, n, grad, dtype) * 0.5).contiguous()


class FusedDistillClip(torch.autograd.Function):
    """apply(x, y, tx, ty, scale, teacher_scale, backend, reduction, needs) -> (contrastive,
    distill, row stats, col stats): both of DistillClipLoss's terms of the student's (x, y) and
    the teacher's (tx, ty) features; gradients to x, y and scale only (needs: which of them
    want one, decided before apply: setup_context runs without grad mode)."""

    @staticmethod
    def forward(x, y, tx, ty, scale, teacher_scale, backend, reduction, needs):
        with serial_host_ops(backend):
            ops = _operands(backend, x, y, tx, ty, scale, teacher_scale)
            rows, cols = distill_forward(*ops, True, backend)
            contrastive, distill = _row_losses(ops[0], ops[1], ops[4], rows, cols)
        return (reduce_loss(contrastive, reduction), reduce_loss(distill, reduction), rows, cols)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, tx, ty, scale, teacher_scale, backend, reduction, needs = inputs
        ctx.options = (backend, reduction)
        ctx.needs = needs
        ctx.dtypes = [x.dtype, y.dtype, scale.dtype]
        ctx.mark_non_differentiable(*output[2:])
        ctx.save_for_backward(x, y, tx, ty, scale, teacher_scale, *output[2:])

    @staticmethod
    def backward(ctx, grad_contrastive, grad_distill, *_):
        backend, reduction = ctx.options
        x, y, tx, ty, scale, teacher_scale, rows, cols = ctx.saved_tensors
        n = x.shape[0]
        with torch.no_grad(), serial_host_ops(backend):
            ops = _operands(backend, x, y, tx, ty, scale, teacher_scale)
            a = _upstream(reduction, n, grad_contrastive, rows.dtype)
            g = _upstream(reduction, n, grad_distill, rows.dtype)
            student = (a + g).contiguous()
            need_q, need_k, need_scale = ctx.needs
            gq, gk = distill_backward(*ops, rows, g, cols, g, need_q or need_scale, need_k,
                                      backend, student, student)
            # The diagonal's part, -2 a_i on s_ii: before the scaling in _input_grads (the
            # scale's gradient, sum_i <gq_i, x_i>, takes it too).
            if need_q or need_scale:
                gq.addcmul_(ops[1].to(gq.dtype), (-2 * a).unsqueeze(1).to(gq.dtype))
            if need_k:
                gk.addcmul_(ops[0].to(gk.dtype), (-2 * a).unsqueeze(1).to(gk.dtype))
            grads = _input_grads(ctx.needs, ops, gq, gk)
        grads = first_order_only(cast_gradients(grads, ctx.dtypes), backend)
        return grads[0], grads[1], None, None, grads[2], None, None, None, None


def distill_clip_fused_loss(image, text, teacher_image, teacher_text, scale, teacher_scale, *,
                            reduction, backend):
    """(contrastive, distill) on a fused backend (validated inputs, scales 0-dim tensors of the
    accumulation dtype), stacked: a (2,) tensor ((2, N) for "none"), in the accumulation
    dtype. The teacher is detached; the features go to the backend's compute dtype inside
    (the gradients come back in the inputs' dtypes)."""
    out = FusedDistillClip.apply(image, text, teacher_image.detach(), teacher_text.detach(),
                                 scale, teacher_scale.detach(), backend, reduction,
                                 requires_grad(image, text, scale))
    return torch.stack(out[:2])
