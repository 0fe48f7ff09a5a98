"""The "torch" backend of similarity distillation: pure PyTorch, row chunk by row chunk, with a
recomputing backward (the chunk size policy of the InfoNCE torch backend).

    s_ij = s_scale <sq_i, sk_j>,  t_ij = t_scale <tq_i, tk_j>
    forward:  row stats (3, N): lse^S_i, lse^T_i, w_i = sum_j softmax_j(t_i.) s_ij
              col stats (3, M): the same over i, merged across chunks in log space (the
              teacher-weighted sums rescaled by e^{old lse^T - new lse^T}, as flash attention)
    backward: G_ij = a_i P^S_ij - g_i P^T_ij + ca_j Pc^S_ij - c_j Pc^T_ij  (P: row softmaxes,
              Pc: column softmaxes; the student weights a, ca default to g, c);
              gq = G sk,  gk = G^T sq
Only one (rows, M) chunk of each score matrix exists at a time.
"""
import torch

from ._torch_chunked import _chunk_rows, new_output


def _tiles(sq, sk, tq, tk, s_scale, t_scale, r0, r1):
    """(student, teacher) scores of rows r0..r1."""
    return (torch.mm(sq[r0:r1], sk.T).mul_(s_scale), torch.mm(tq[r0:r1], tk.T).mul_(t_scale))


def _weighted(s, t, lse_t, dim):
    """sum along ``dim`` of softmax(t) s, given t's log-sum-exp along ``dim``."""
    return (torch.exp(t - lse_t.unsqueeze(dim)) * s).sum(dim)


def distill_forward(sq, sk, tq, tk, s_scale, t_scale, *, with_cols=False):
    """(row stats (3, N), col stats (3, M) or None)."""
    n, m = sq.shape[0], sk.shape[0]
    rows = new_output((3, n), sq.dtype, sq.device)
    cols = None
    if with_cols:
        cols = torch.zeros((3, m), dtype=sq.dtype, device=sq.device)
        cols[:2] = float("-inf")
    step = _chunk_rows(sq, 2 * m)  # two tiles per chunk
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        s, t = _tiles(sq, sk, tq, tk, s_scale, t_scale, r0, r1)
        rows[0, r0:r1] = torch.logsumexp(s, dim=1)
        rows[1, r0:r1] = lse_t = torch.logsumexp(t, dim=1)
        rows[2, r0:r1] = _weighted(s, t, lse_t, 1)
        if with_cols:
            chunk_t = torch.logsumexp(t, dim=0)
            chunk_w = _weighted(s, t, chunk_t, 0)
            torch.logaddexp(cols[0], torch.logsumexp(s, dim=0), out=cols[0])
            merged_t = torch.logaddexp(cols[1], chunk_t)
            # Rescale both weighted sums to the merged teacher normaliser (exp(-inf) = 0 first).
            cols[2] = (cols[2] * torch.exp(cols[1] - merged_t)
                       + chunk_w * torch.exp(chunk_t - merged_t))
            cols[1] = merged_t
    return rows, cols


def _gap(s, t, lse_s, lse_t, a, g):
    """a e^{s - lse_s} - g e^{t - lse_t} (a is g: one product, the distillation alone)."""
    if a is g:
        return (torch.exp(s - lse_s) - torch.exp(t - lse_t)).mul_(g)
    return torch.exp(s - lse_s).mul_(a).sub_(torch.exp(t - lse_t).mul_(g))


def distill_backward(sq, sk, tq, tk, s_scale, t_scale, row_stats, row_grad, col_stats=None,
                     col_grad=None, *, need_gq=True, need_gk=True, row_student_grad=None,
                     col_student_grad=None):
    """(gq (N, D) or None, gk (M, D) or None) for the G above; recomputes each tile."""
    a = row_grad if row_student_grad is None else row_student_grad
    ca = col_grad if col_student_grad is None else col_student_grad
    n, m = sq.shape[0], sk.shape[0]
    gq = new_output(sq.shape, sq.dtype, sq.device) if need_gq else None
    gk = torch.zeros_like(sk) if need_gk else None
    step = _chunk_rows(sq, 2 * m)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        s, t = _tiles(sq, sk, tq, tk, s_scale, t_scale, r0, r1)
        g = row_grad[r0:r1, None]
        h = _gap(s, t, row_stats[0, r0:r1, None], row_stats[1, r0:r1, None],
                 g if a is row_grad else a[r0:r1, None], g)
        if col_stats is not None:
            h.add_(_gap(s, t, col_stats[0], col_stats[1], ca, col_grad))
        del s, t
        if need_gq:
            torch.mm(h, sk, out=gq[r0:r1])
        if need_gk:
            gk.addmm_(h.T, sq[r0:r1])
    return gq, gk
