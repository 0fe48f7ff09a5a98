"""SupCon's positive term, one autograd.Function: per anchor a with dense class id c(a),

    pos_a = k_a <z_a, O_a>,  O_a = S_c(a) - z_a,  S_c = sum_{b: c(b) = c} z_b,
    k_a = scale / max(p_a, 1)

(the mean of s_ab = scale <z_a, z_b> over a's positives b != a, p_a = |c(a)| - 1 of them: O_a is
the sum of their features). When SupCon normalises, z is already normalized_rows(x), shared with
its denominator. Backward, for the upstream gradient u:

    dL/dz_b   = u_b k_b O_b + (T_c(b) - u_b k_b z_b),  T_c = sum_{a: c(a) = c} u_a k_a z_a
    dL/dscale = sum_a u_a pos_a / scale
    normalized_rows: dL/dx = inv (dz - z <z, dz>)   (inv dz where the eps clamp is active; _host's
                                                    normalized_copy_backward_)

Hand-written because autograd over the same ops takes about twice as long at N = 16384, D = 256
(the normalisation's graph and an extra (N, D) gather), a thirtieth of the fused SupCon step.
Whole-tensor passes, few of them (5 in the forward, 6 in the backward on features that
supcon_loss normalised already, normalized_rows): on a busy CPU every parallel ATen op waits at its
barrier for a thread that the OS has descheduled, so the number of passes counts, not only their
bytes (the earlier cache-sized row chunks made ~40 such ops per step at N = 8192, each costing up
to a time slice beside one busy process per core). The
subtraction of a's own term happens on the (N, D) sums, before any dot product: the dot
<z_a, S_c(a)> - |z_a|^2 rounded like the whole class sum and cost SupCon's fp32 gradients a
factor of plain PyTorch's error at D = 3. First-order only: a second backward raises, as the
fused pass's does (_host.first_order_only)."""
import torch

from ._host import first_order_only, normalized_copy_backward_, rowwise_dot
from ._host_threads import serial_host_ops


class _PositiveMeans(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, scale, cls, class_sizes, backend):
        # others_a = S_c(a) - z_a, the sum of a's positives: <z_a, others_a> carries no |z_a|^2
        # to cancel against <z_a, S_c(a)> (at D = 3 and tau = 0.05 that difference rounded like
        # the whole class sum).
        with serial_host_ops(backend):
            others = class_sums(z, cls).index_select(0, cls).sub_(z)
            k = scale / (class_sizes - 1).clamp_min(1).to(z.dtype)
            pos = k * rowwise_dot(z, others)
        ctx.save_for_backward(z, others, k, cls, scale, pos)
        ctx.backend = backend
        return pos

    @staticmethod
    def backward(ctx, u):
        z, others, k, cls, scale, pos = ctx.saved_tensors
        dz = dscale = None
        if ctx.needs_input_grad[0]:
            with serial_host_ops(ctx.backend):
                uk = (u * k).unsqueeze(1)
                # dz_b = u_b k_b (S_c(b) - 2 z_b) + T_c(b), T_c = sum_{a: c(a) = c} u_a k_a z_a:
                # uk_b others_b + (T_c(b) - uk_b z_b), the sum over b's positives a != b.
                weighted = z * uk
                dz = class_sums(weighted, cls).index_select(0, cls).sub_(weighted)
                dz.addcmul_(others, uk)
                del weighted
            dz, = first_order_only((dz,), ctx.backend)
        if ctx.needs_input_grad[1]:
            dscale = (u * pos).sum() / scale
        return dz, dscale, None, None, None


class _NormalizedRows(torch.autograd.Function):
    """z = x / max(|x|, eps) row by row; backward dx = inv (dz - z <z, dz>) (inv dz where the
    eps clamp is active; _host.normalized_copy_backward_): one row-wise dot and a few passes,
    where autograd's graph of the same ops takes about twice as long."""

    @staticmethod
    def forward(ctx, x, eps, backend):
        with serial_host_ops(backend):
            inv = 1.0 / x.norm(dim=1).clamp_min(eps)
            z = x * inv.unsqueeze(1)
        # x only for its version counter: an in-place edit of the features after the forward
        # raises in the backward, as with plain PyTorch's normalisation.
        ctx.save_for_backward(z, inv, x)
        ctx.eps, ctx.backend = eps, backend
        return z

    @staticmethod
    def backward(ctx, dz):
        z, inv, _ = ctx.saved_tensors
        # a copy: the incoming gradient is autograd's, not ours to overwrite
        with serial_host_ops(ctx.backend):
            dx = normalized_copy_backward_(dz.clone(), z, inv, ctx.eps)
        dx, = first_order_only((dx,), ctx.backend)
        return dx, None, None


def normalized_rows(x, eps, backend):
    """x / max(|x|, eps) row by row (x (N, D)), with a hand-written first-order backward: SupCon
    normalises its features once, for its denominator and its positive term together, so that
    their gradients meet before one backward of the normalisation."""
    return _NormalizedRows.apply(x, eps, backend)


def class_sums(z, cls):
    """(N, D): row c is the sum of the rows of z whose class is c (rows of absent classes 0)."""
    return torch.zeros_like(z).index_add_(0, cls, z)


def supcon_positive_means(z, scale, cls, class_sizes, *, backend):
    """pos (N,): each anchor's mean positive score (0 where it has no positive); z (N, D) the
    features as scored (normalized_rows(x) when SupCon normalises), scale a 0-dim tensor of z's
    dtype, cls (N,) dense class ids in [0, N) (_host.class_index), class_sizes (N,) the size
    of each anchor's class (int)."""
    return _PositiveMeans.apply(z, scale, cls, class_sizes, backend)
