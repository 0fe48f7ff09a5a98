"""The "torch" backend of the Matryoshka log-sum-exp ops (fastcontrast/infonce/matryoshka_ops.py):
pure PyTorch, row chunk by row chunk, every prefix's scores from the same partial products.

With prefix bounds 0 = b_0 < b_1 < ... < b_P = d_P (chunk c holds dimensions b_c .. b_{c+1}):

    S^p_ij = sum_{c <= p} <x_i[chunk c], y_j[chunk c]>      (the raw prefix product, cumulative)
    s^p_ij = alpha_pi beta_pj S^p_ij,   masked (-inf) where exclude_diag and j == i
    forward:  row_lse_pi = logsumexp_j s^p_ij,  col_lse_pj = logsumexp_i s^p_ij
    backward: dS^p_ij = g_pi exp(s^p_ij - row_lse_pi) + c_pj exp(s^p_ij - col_lse_pj)
              H^p = alpha_p beta_p dS^p,  G_c = sum_{p >= c} H^p     (one weight per chunk)
              dx[:, chunk c] = G_c y[:, chunk c],   dy[:, chunk c] = G_c^T x[:, chunk c]
              dalpha_pi = sum_j dS^p_ij beta_pj S^p_ij,  dbeta_pj = sum_i dS^p_ij alpha_pi S^p_ij

so each chunk's products are formed once per row chunk (forward) and the gradient costs one
product per chunk, whatever the number of prefixes. The chunk's P score tiles are held at once:
the chunk rows are the torch backend's budget over P."""
import torch

from ._torch_chunked import _chunk_rows, _unreachable_to_inf, new_output

__all__ = ["matryoshka_lse_forward", "matryoshka_lse_backward"]


def _prefix_products(x, y, bounds, r0, r1):
    """[S^0, ..., S^{P-1}] of rows r0..r1, each (r1 - r0, M): cumulative over the chunks."""
    tiles = []
    for c in range(len(bounds) - 1):
        lo, hi = bounds[c], bounds[c + 1]
        part = torch.mm(x[r0:r1, lo:hi], y[:, lo:hi].T)
        tiles.append(part if not tiles else part.add_(tiles[-1]))
    return tiles


def _diagonal(r0, r1, m, device):
    """(tile rows, columns) of the entries j == i of rows r0..r1 inside an M-column tile."""
    rows = torch.arange(r0, min(r1, m), device=device)
    return rows - r0, rows


def _rows(x, y, bounds):
    return max(1, _chunk_rows(x, y.shape[0]) // (len(bounds) - 1))


def matryoshka_lse_forward(x, y, alpha, beta, bounds, *, exclude_diag=False, with_col_lse=False):
    """(row_lse (P, N), col_lse (P, M) or None) of the module docstring; -inf where no entry."""
    n, m, p_count = x.shape[0], y.shape[0], len(bounds) - 1
    row_lse = new_output((p_count, n), x.dtype, x.device)
    col_lse = (torch.full((p_count, m), float("-inf"), dtype=x.dtype, device=x.device)
               if with_col_lse else None)
    step = _rows(x, y, bounds)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        di, dj = _diagonal(r0, r1, m, x.device) if exclude_diag else (None, None)
        for p, s in enumerate(_prefix_products(x, y, bounds, r0, r1)):
            s.mul_(alpha[p, r0:r1, None]).mul_(beta[p, None, :])
            if exclude_diag:
                s[di, dj] = float("-inf")
            row_lse[p, r0:r1] = torch.logsumexp(s, dim=1)
            if with_col_lse:
                torch.logaddexp(col_lse[p], torch.logsumexp(s, dim=0), out=col_lse[p])
    return row_lse, col_lse


def matryoshka_lse_backward(x, y, alpha, beta, bounds, row_lse, row_grad, col_lse=None,
                            col_grad=None, *, exclude_diag=False):
    """(dx (N, D), dy (M, D), dalpha (P, N), dbeta (P, M)) of the module docstring; dx and dy
    are 0 beyond the last bound."""
    n, m, p_count = x.shape[0], y.shape[0], len(bounds) - 1
    dx, dy = torch.zeros_like(x), torch.zeros_like(y)
    dalpha, dbeta = torch.zeros_like(alpha), torch.zeros_like(beta)
    row_lse = _unreachable_to_inf(row_lse)
    col_lse = None if col_lse is None else _unreachable_to_inf(col_lse)
    step = _rows(x, y, bounds)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        di, dj = _diagonal(r0, r1, m, x.device) if exclude_diag else (None, None)
        tiles = _prefix_products(x, y, bounds, r0, r1)
        folded = None
        for p in reversed(range(p_count)):
            raw = tiles[p]
            a, b = alpha[p, r0:r1, None], beta[p, None, :]
            s = raw * a * b
            ds = torch.exp(s - row_lse[p, r0:r1, None]).mul_(row_grad[p, r0:r1, None])
            if col_lse is not None:
                ds.add_(torch.exp(s.sub_(col_lse[p, None, :])).mul_(col_grad[p, None, :]))
            del s
            if exclude_diag:
                ds[di, dj] = 0.0
            dalpha[p, r0:r1] = (ds * raw).mul_(b).sum(dim=1)
            dbeta[p] += (ds * raw).mul_(a).sum(dim=0)
            h = ds.mul_(a).mul_(b)
            folded = h if folded is None else folded.add_(h)  # G_p = H^p + G_{p+1}
            lo, hi = bounds[p], bounds[p + 1]
            dx[r0:r1, lo:hi] = folded @ y[:, lo:hi]
            dy[:, lo:hi].addmm_(folded.T, x[r0:r1, lo:hi])
            tiles[p] = None
    return dx, dy, dalpha, dbeta
