"""SupCon's positive term, one autograd.Function: per anchor a with dense class id c(a),

    pos_a = k_a (<z_a, S_c(a)> - |z_a|^2),  S_c = sum_{b: c(b) = c} z_b,  k_a = scale / max(p_a, 1)

(the mean of s_ab = scale <z_a, z_b> over a's positives b != a, p_a = |c(a)| - 1 of them), with
z = x / max(|x|, eps) when normalising. Backward, for the upstream gradient u:

    dL/dz_b   = u_b k_b (S_c(b) - 2 z_b) + sum_{a: c(a) = c(b)} u_a k_a z_a
    dL/dscale = sum_a u_a pos_a / scale
    dL/dx     = inv (dz - z <z, dz>)      (inv dz where the eps clamp is active; _host's
                                          normalized_copy_backward_)

Hand-written because autograd over the same ops takes about twice as long at N = 16384, D = 256
(the normalisation's graph and an extra (N, D) gather): ~33 ms against ~65 ms on 2 threads (forward
~12 ms, backward ~21 ms with its gathers, arithmetic and normalisation in cache-sized row chunks:
~34 ms as whole-tensor passes), a thirtieth of the fused SupCon step. First-order only: a second
backward raises, as the fused pass's does (_host.first_order_only)."""
import torch

from ._host import (HOST_CHUNK_ROWS, first_order_only, normalized_copy_backward_, row_chunks,
                    rowwise_dot)

# Rows per chunk of the (R, D) passes below: their temporaries stay in cache between the gather,
# the arithmetic and the normalisation's backward (2 MiB at D = 256 in float32).
_CHUNK_ROWS = HOST_CHUNK_ROWS // 2


def _chunks(n):
    return row_chunks(n, _CHUNK_ROWS)


class _PositiveMeans(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, cls, class_sizes, normalize, eps, backend):
        inv = 1.0 / x.norm(dim=1).clamp_min(eps)
        z = x * inv.unsqueeze(1) if normalize else x
        sums = torch.zeros_like(z).index_add_(0, cls, z)
        k = scale / (class_sizes - 1).clamp_min(1).to(x.dtype)
        dots = torch.empty_like(k)
        for r0, r1 in _chunks(z.shape[0]):
            zc = z[r0:r1]
            dots[r0:r1] = rowwise_dot(zc, sums.index_select(0, cls[r0:r1])) - rowwise_dot(zc, zc)
        pos = k * dots
        ctx.save_for_backward(z, inv, sums, k, cls, scale, pos)
        ctx.normalize, ctx.eps, ctx.backend = normalize, eps, backend
        return pos

    @staticmethod
    def backward(ctx, u):
        z, inv, sums, k, cls, scale, pos = ctx.saved_tensors
        dx = dscale = None
        if ctx.needs_input_grad[0]:
            uk = (u * k).unsqueeze(1)
            # T_c = sum_{a: c(a) = c} u_a k_a z_a, then dz_b = u_b k_b (S_c(b) - 2 z_b) + T_c(b)
            # and the normalisation's backward, chunk by chunk.
            t = torch.zeros_like(z)
            for r0, r1 in _chunks(z.shape[0]):
                t.index_add_(0, cls[r0:r1], z[r0:r1] * uk[r0:r1])
            dz = torch.empty_like(z)
            for r0, r1 in _chunks(z.shape[0]):
                out, idx = dz[r0:r1], cls[r0:r1]
                torch.index_select(sums, 0, idx, out=out)
                out.sub_(z[r0:r1], alpha=2).mul_(uk[r0:r1]).add_(t.index_select(0, idx))
                if ctx.normalize:
                    normalized_copy_backward_(out, z[r0:r1], inv[r0:r1], ctx.eps)
            dx, = first_order_only((dz,), ctx.backend)
        if ctx.needs_input_grad[1]:
            dscale = (u * pos).sum() / scale
        return dx, dscale, None, None, None, None, None


def supcon_positive_means(x, scale, cls, class_sizes, *, normalize, eps, backend):
    """pos (N,): each anchor's mean positive score (0 where it has no positive); x (N, D), scale
    a 0-dim tensor of x's dtype, cls (N,) dense class ids in [0, N) (infonce._class_index),
    class_sizes (N,) the size of each anchor's class (int)."""
    return _PositiveMeans.apply(x, scale, cls, class_sizes, normalize, eps, backend)
