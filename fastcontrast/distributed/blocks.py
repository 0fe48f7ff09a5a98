"""The work of one rank on one block of keys, the same in both modes: its local rows against a
block of the keys of the group (gather: all of them at once; ring: one travelling rank's block),
through the registered kernel ops of fastcontrast.infonce and fastcontrast.siglip.

A block holds the keys of global (concatenated) index lo .. lo + M_b. The rows are this rank's,
already normalised when the loss normalises, scaled by ``scale`` (alpha_i = scale, beta_j = 1).

InfoNCE (masked log-sum-exp, s_ij = scale <x_i, y_j>):
    forward:  row_lse_i over the block's unmasked keys, the partial col_lse_j of the block's keys
              over this rank's rows, and the positive s_{i, p_i} of the rows whose positive p_i
              lies in the block
    backward: dS_ij = g_i exp(s_ij - row_lse_i) + c_j exp(s_ij - col_lse_j) with the global
              row_lse and col_lse, plus gp_i (the weight of the positive output) at the
              positive: dx (this rank's rows) and the
              block's partial dy (this rank's share, summed over ranks by the caller)
    Self-exclusion: entry j == i + diag_offset masked (diag_offset = this rank's offset - lo).

SigLIP (z_ij = scale <x_i, y_j> + bias, loss_i = sum_j softplus(-y_ij z_ij)):
    the kernels put the positive at local column i; the global positive of row i is column
    offset + i. Where they differ, softplus(z) = softplus(-z) + z turns the kernel's result into
    the right one: + z_{i,i} (a negative the kernel took for a positive) and - z_{i, offset+i-lo}
    (the positive, inside the block, the kernel took for a negative).
"""
import torch

from .._host import HOST_CHUNK_ROWS, accumulate_dtype, rowwise_dot
from ..infonce import masked_lse_backward, masked_lse_forward
from ..siglip import siglip_backward, siglip_forward

__all__ = ["lse_block_forward", "lse_block_backward", "siglip_block_forward",
           "siglip_block_backward"]


def _positives_in(targets, lo, m):
    """[(rows whose positive is in keys lo..lo+m, their column in the block)] in groups of at
    most a quarter block (the copies x[rows], y[cols] stay small); [] without targets."""
    if targets is None:
        return []
    hit = ((targets >= lo) & (targets < lo + m)).nonzero().squeeze(1)
    step = min(HOST_CHUNK_ROWS, max(1, -(-m // 4)))
    return [(hit[h0:h0 + step], targets[hit[h0:h0 + step]] - lo)
            for h0 in range(0, hit.numel(), step)]


def lse_block_forward(x, scale, y, lo, diag_offset, with_col, targets, positive, backend,
                      row_ids=None, col_ids=None, lse_filter=None):
    """(row_lse (N,), col_lse (M_b,) or None) of the block in the accumulation dtype; fills
    positive[i] (accumulation dtype) for the rows whose positive targets[i] is in the block.
    diag_offset None: no diagonal masked; row_ids (N,) / col_ids (M_b,): entries with
    row_ids_i == col_ids_j >= 0 masked (None: no id mask)."""
    acc = accumulate_dtype(x.dtype)
    alpha = scale.to(acc).expand(x.shape[0]).contiguous()
    beta = torch.ones(y.shape[0], dtype=acc, device=x.device)
    exclude = diag_offset is not None
    row_lse, col_lse = masked_lse_forward(x, y, alpha, beta, row_ids, col_ids, exclude,
                                          diag_offset if exclude else 0, with_col, backend,
                                          **(lse_filter or {}))
    for rows, cols in _positives_in(targets, lo, y.shape[0]):
        positive[rows] = rowwise_dot(x[rows], y[cols]) * scale.to(acc)
    return row_lse.to(acc), (col_lse.to(acc) if with_col else None)


def lse_block_backward(x, scale, y, lo, diag_offset, row_lse, g, col_lse, c, targets, g_pos,
                       need_dy, backend, row_ids=None, col_ids=None, lse_filter=None):
    """(dx (N, D), dy (M_b, D) or None) in the accumulation dtype for row weights g (N,), the
    block's column weights c (M_b,) with their global col_lse (None without a column term) and
    the weights g_pos (N,) of the positives (None without targets); masks as the forward."""
    acc = accumulate_dtype(x.dtype)
    alpha = scale.to(acc).expand(x.shape[0]).contiguous()
    beta = torch.ones(y.shape[0], dtype=acc, device=x.device)
    exclude = diag_offset is not None
    with_col = col_lse is not None
    dx, dy = masked_lse_backward(
        x, y, alpha, beta, row_lse.to(acc).contiguous(), g.to(acc).contiguous(),
        col_lse.to(acc).contiguous() if with_col else None,
        c.to(acc).contiguous() if with_col else None, row_ids, col_ids, exclude,
        diag_offset if exclude else 0, True, need_dy, backend, **(lse_filter or {}))
    dx = dx.to(acc)
    dy = dy.to(acc) if need_dy else None
    for rows, cols in _positives_in(targets, lo, y.shape[0]):
        coef = (g_pos[rows].to(acc) * scale.to(acc)).unsqueeze(1)
        dx.index_add_(0, rows, y[cols].to(acc) * coef)
        if need_dy:
            dy.index_add_(0, cols, x[rows].to(acc) * coef)
    return dx, dy


def _corrections(n, m, lo, offset):
    """[(rows, cols, sign)] of the SigLIP corrections of a block (see the module docstring)."""
    if offset == lo:
        return []
    out = []
    rows = torch.arange(min(n, m))
    out.append((rows, rows, 1.0))
    rows = torch.arange(n)
    cols = offset + rows - lo
    keep = (cols >= 0) & (cols < m)
    if bool(keep.any()):
        out.append((rows[keep], cols[keep], -1.0))
    return out


def siglip_block_forward(x, y, scale, bias, lo, offset, backend):
    """Per-row loss (N,) of this rank's rows over the block (accumulation dtype)."""
    acc = accumulate_dtype(x.dtype)
    loss = siglip_forward(x, y, scale.to(x.dtype), bias.to(x.dtype), backend).to(acc)
    for rows, cols, sign in _corrections(x.shape[0], y.shape[0], lo, offset):
        rows, cols = rows.to(x.device), cols.to(x.device)
        z = rowwise_dot(x[rows], y[cols]) * scale.to(acc) + bias.to(acc)
        loss.index_add_(0, rows, sign * z)
    return loss


def siglip_block_backward(x, y, scale, bias, lo, offset, g, need_dy, backend):
    """(gx (N, D), gy (M_b, D) or None, d scale, d bias) in the accumulation dtype for row
    weights g; gx, gy before the factor scale (d x = scale gx)."""
    acc = accumulate_dtype(x.dtype)
    gx, gy, dz_total = siglip_backward(x, y, scale.to(x.dtype), bias.to(x.dtype),
                                       g.to(x.dtype).contiguous(), True, need_dy, backend)
    gx, dbias = gx.to(acc), dz_total.to(acc)
    gy = gy.to(acc) if need_dy else None
    dscale = rowwise_dot(x, gx).sum()
    for rows, cols, sign in _corrections(x.shape[0], y.shape[0], lo, offset):
        rows, cols = rows.to(x.device), cols.to(x.device)
        w = (sign * g[rows].to(acc)).unsqueeze(1)
        gx.index_add_(0, rows, y[cols].to(acc) * w)
        if need_dy:
            gy.index_add_(0, cols, x[rows].to(acc) * w)
        dscale = dscale + (w.squeeze(1) * rowwise_dot(x[rows], y[cols])).sum()
        dbias = dbias + w.sum()
    return gx, gy, dscale, dbias
