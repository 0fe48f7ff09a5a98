"""The autograd.Function of fastcontrast.distributed.distill_info_nce, in both modes, on the fused
distillation kernels (fastcontrast/distill.py's ops): this rank's student / teacher rows against
the student / teacher keys of every rank, never an N x M matrix.

Per block b of keys the kernels give, per row, (lse^S_b, lse^T_b, w_b), w_b = sum_{j in b}
p^T_b,ij s_ij with p^T normalised inside the block. Disjoint key sets merge exactly
(``merge_stats``):

    lse^S = logaddexp(lse^S_a, lse^S_b),  lse^T = logaddexp(lse^T_a, lse^T_b),
    w = exp(lse^T_a - lse^T) w_a + exp(lse^T_b - lse^T) w_b

and loss_i = lse^S_i - w_i over every rank's keys; a symmetric loss merges the column
statistics of each key over every rank's rows the same way, loss_i = (row_i + col_i) / 2.

    gather  the student and teacher keys all-gathered (O(M_total (D + DT))), one forward and one
            backward kernel call; the column statistics merged across ranks with all-reduces
            (O(M_total) floats), the column weights all-gathered, the key gradients
            reduce-scattered (as gather.py)
    ring    the key blocks travel around the ring (ring.circulate / circulate_gradients), the
            column statistics one step behind their block, the key-gradient accumulators home
            with it (as ring.py)

Backward: G_ij = g_i (P^S_ij - p^T_ij) + c_j (Pc^S_ij - pc^T_ij) with the global statistics
(distill_backward); every rank's keys get the gradient of the sum of all ranks' losses. The
student scale's gradient is this rank's share, sum_i <dx_i, x_i> / scale over its rows (as
ops.DistributedLSE); the teacher gets none.
"""
import torch
import torch.distributed as dist

from .._host import accumulate_dtype, rowwise_dot
from ..distill import distill_backward, distill_forward
from .collectives import all_gather_rows, all_reduce_logsumexp, reduce_scatter_rows
from .ring import circulate, circulate_gradients, key_chunks

__all__ = ["DistributedDistill", "merge_stats"]


def merge_stats(a, b):
    """The (3, m) statistics (lse^S, lse^T, w) of the union of two disjoint key sets."""
    lse_t = torch.logaddexp(a[1], b[1])
    w = torch.exp(a[1] - lse_t) * a[2] + torch.exp(b[1] - lse_t) * b[2]
    return torch.stack([torch.logaddexp(a[0], b[0]), lse_t, w])


def _all_reduce_stats(comm, part):
    """merge_stats over the ranks' (3, m) statistics of disjoint row sets."""
    if comm.world == 1:
        return part
    lse_s, lse_t = (all_reduce_logsumexp(comm, part[k].contiguous()) for k in (0, 1))
    w = torch.exp(part[1] - lse_t) * part[2]
    dist.all_reduce(w, group=comm.group)
    return torch.stack([lse_s, lse_t, w])


def _gather_forward(comm, sizes, symmetric, backend, sq, sk, tq, tk, scales, acc):
    keys = [all_gather_rows(comm, t.contiguous(), sizes) for t in (sk, tk)]
    rows, cols = distill_forward(sq, keys[0], tq, keys[1], *scales, symmetric, backend)
    cols_all = _all_reduce_stats(comm, cols.to(acc)) if symmetric else None
    off = sum(sizes[:comm.rank])
    own = cols_all[:, off:off + sizes[comm.rank]] if symmetric else None
    return rows.to(acc), own, (keys[0], keys[1], cols_all)


def _ring_forward(comm, sizes, symmetric, backend, sq, sk, tq, tk, scales, acc):
    rows = [None]

    def compute(s, block):
        part, cols = distill_forward(sq, block[0], tq, block[1], *scales, symmetric, backend)
        part = part.to(acc)
        rows[0] = part if rows[0] is None else merge_stats(rows[0], part)
        return [cols.to(acc)] if symmetric else []

    home = circulate(comm, [sk, tk], lambda s: [sk.new_empty(sizes[s], sk.shape[1]),
                                                tk.new_empty(sizes[s], tk.shape[1])],
                     lambda s: ([torch.empty(3, sizes[s], dtype=acc, device=sq.device)]
                                if symmetric else []), compute, merge_stats)
    return rows[0], (home[0] if symmetric else None), ()


def _gather_backward(comm, sizes, symmetric, backend, x, row_stats, col_stats, weight, saved):
    sq, _, tq, _, scales = x
    keys, teacher_keys, cols_all = saved
    c_all = all_gather_rows(comm, weight.contiguous(), sizes) if symmetric else None
    gq, gk = distill_backward(sq, keys, tq, teacher_keys, *scales, row_stats, weight, cols_all,
                              c_all, True, True, backend)
    return gq.to(row_stats.dtype), reduce_scatter_rows(comm, gk.to(row_stats.dtype), sizes)


def _ring_backward(comm, sizes, symmetric, backend, x, row_stats, col_stats, weight, saved):
    sq, sk, tq, tk, scales = x
    acc = row_stats.dtype
    gq = torch.zeros(sq.shape, dtype=acc, device=sq.device)
    payload = [sk, tk] + ([weight.contiguous(), col_stats] if symmetric else [])

    def payload_like(s):
        m = sizes[s]
        out = [sk.new_empty(m, sk.shape[1]), tk.new_empty(m, tk.shape[1])]
        if symmetric:
            out += [torch.empty(m, dtype=acc, device=sq.device),
                    torch.empty(3, m, dtype=acc, device=sq.device)]
        return out

    def accumulate(s, block, gk):
        for j0, j1 in key_chunks(block[0].shape[0]):
            cols = (block[3][:, j0:j1], block[2][j0:j1]) if symmetric else (None, None)
            part_q, part_k = distill_backward(sq, block[0][j0:j1], tq, block[1][j0:j1], *scales,
                                              row_stats, weight, *cols, True, True, backend)
            gq.add_(part_q.to(acc))
            gk[j0:j1].add_(part_k.to(acc))
            del part_q, part_k  # before the next chunk's

    gk = circulate_gradients(comm, payload, payload_like,
                             lambda s: torch.empty(sizes[s], sk.shape[1], dtype=acc,
                                                   device=sq.device), accumulate)
    return gq, gk


class DistributedDistill(torch.autograd.Function):
    """apply(sq, sk, tq, tk, s_scale, t_scale, comm, sizes, symmetric, mode, backend) ->
    per-row loss (N_r,) in the accumulation dtype: this rank's (normalised) student rows sq
    against every rank's student keys (``sizes``: every rank's key count); symmetric:
    (row_i + col_i) / 2, col_i this rank's key i against every rank's queries (N_r == M_r).
    Scales: 0-dim tensors in the accumulation dtype. Gradients to sq, sk and s_scale."""

    @staticmethod
    def forward(ctx, sq, sk, tq, tk, s_scale, t_scale, comm, sizes, symmetric, mode, backend):
        acc = accumulate_dtype(sq.dtype)
        scales = (s_scale.detach(), t_scale.detach())
        run = _gather_forward if mode == "gather" else _ring_forward
        row_stats, col_stats, saved = run(comm, sizes, symmetric, backend, sq, sk, tq, tk,
                                          scales, acc)
        loss = row_stats[0] - row_stats[2]
        if symmetric:
            loss = 0.5 * (loss + (col_stats[0] - col_stats[2]))
        ctx.comm, ctx.sizes, ctx.symmetric, ctx.mode, ctx.backend = (comm, sizes, symmetric,
                                                                       mode, backend)
        ctx.save_for_backward(sq, sk, tq, tk, s_scale, t_scale, row_stats, col_stats, *saved)
        return loss

    @staticmethod
    def backward(ctx, grad):
        sq, sk, tq, tk, s_scale, t_scale, row_stats, col_stats, *saved = ctx.saved_tensors
        acc = row_stats.dtype
        weight = (grad.to(acc) * (0.5 if ctx.symmetric else 1.0)).contiguous()
        x = (sq, sk, tq, tk, (s_scale.detach(), t_scale.detach()))
        run = _gather_backward if ctx.mode == "gather" else _ring_backward
        gq, gk = run(ctx.comm, ctx.sizes, ctx.symmetric, ctx.backend, x, row_stats, col_stats,
                     weight, saved)
        d_scale = None
        if ctx.needs_input_grad[4]:
            d_scale = rowwise_dot(sq.to(acc), gq).sum().to(s_scale.dtype)
        scale = s_scale.to(acc)
        return ((gq * scale).to(sq.dtype), (gk * scale).to(sk.dtype), None, None, d_scale, None,
                None, None, None, None, None)
