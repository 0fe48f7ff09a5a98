"""The "torch" backend: masked log-sum-exp of a scaled product in pure PyTorch, row chunk by row
chunk, with a recomputing backward. Bounded memory on any device, no compiler needed.

    s_ij = alpha_i beta_j <x_i, y_j>, masked where exclude_diag and j == i + diag_offset
           or row_ids_i == col_ids_j >= 0
    forward:  row_lse_i = logsumexp_j s_ij, col_lse_j = logsumexp_i s_ij (merged across chunks)
    backward: dS_ij = g_i exp(s_ij - row_lse_i) + c_j exp(s_ij - col_lse_j)
              dx_i = alpha_i sum_j dS_ij beta_j y_j,   dy_j = beta_j sum_i dS_ij alpha_i x_i
"""

import torch

from ._config import settings
from ._torch_filter import split_filtered

# Score elements per chunk (rows * keys): 16 MiB of fp32 on CPU, 256 MiB on a GPU.
_CPU_CHUNK_ELEMENTS = 1 << 22
_GPU_CHUNK_ELEMENTS = 1 << 26


def new_output(shape, dtype, device):
    """torch.empty for an output written completely; NaN-filled under the poison_outputs setting
    (fastcontrast/_config.py), so that an element never written shows up in the tests."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if settings().poison_outputs else out


def _chunk_rows(x, n_keys):
    budget = settings().torch_chunk_elements or (
        _GPU_CHUNK_ELEMENTS if x.is_cuda else _CPU_CHUNK_ELEMENTS)
    return max(1, budget // max(1, n_keys))


def _fill_masked(t, value, r0, r1, exclude_diag, diag_offset, row_ids, col_ids):
    """Sets the masked entries of the (r1 - r0, M) tile of rows r0..r1 to ``value``, in place."""
    if exclude_diag:
        rows = torch.arange(r0, r1, device=t.device)
        cols = rows + diag_offset
        keep = (cols >= 0) & (cols < t.shape[1])
        t[(rows - r0)[keep], cols[keep]] = value
    if row_ids is not None:
        ids = row_ids[r0:r1, None]
        t.masked_fill_((ids == col_ids[None, :]) & (ids >= 0), value)
    return t


def _scores(x, y, alpha, beta, r0, r1, exclude_diag, diag_offset, row_ids, col_ids):
    """The (r1 - r0, M) tile of s for rows r0..r1, masked entries set to -inf (after the scales,
    so a NaN or zero scale never turns a masked entry into NaN), then the candidates that the
    false-negative filter drops (_filtered_scores)."""
    s = torch.mm(x[r0:r1], y.T)
    s.mul_(alpha[r0:r1, None]).mul_(beta[None, :])
    return _fill_masked(s, float("-inf"), r0, r1, exclude_diag, diag_offset, row_ids, col_ids)


def _filtered_scores(x, y, alpha, beta, r0, r1, masks, lse_filter):
    """(s_row, s_col, row counts, column counts): the tile of _scores with the row and the column
    rule of the false-negative filter applied apart (_torch_filter.split_filtered; without a
    filter s_row is s_col and the counts are None)."""
    s = _scores(x, y, alpha, beta, r0, r1, *masks)
    if not lse_filter:
        return s, s, None, None
    return split_filtered(s, r0, r1, **lse_filter)


def _unreachable_to_inf(lse):
    """exp(s - lse) must be 0 when lse = -inf (no candidate): use +inf there."""
    return torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)


def masked_lse_forward(q, keys, alpha, beta, *, exclude_diag=False, diag_offset=0, row_ids=None,
                       col_ids=None, with_col_lse=False, **lse_filter):
    """(row_lse (N,), col_lse (M,) or None) over unmasked entries; -inf where none."""
    masks = (exclude_diag, diag_offset, row_ids, col_ids)
    n, m = q.shape[0], keys.shape[0]
    row_lse = new_output(n, q.dtype, q.device)
    col_lse = torch.full((m,), float("-inf"), dtype=q.dtype, device=q.device) \
        if with_col_lse else None
    step = _chunk_rows(q, m)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        s, s_col, _, _ = _filtered_scores(q, keys, alpha, beta, r0, r1, masks, lse_filter)
        row_lse[r0:r1] = torch.logsumexp(s, dim=1)
        if with_col_lse:
            torch.logaddexp(col_lse, torch.logsumexp(s_col, dim=0), out=col_lse)
    return row_lse, col_lse


def masked_lse_backward(q, keys, alpha, beta, row_lse, row_grad, col_lse=None, col_grad=None, *,
                        exclude_diag=False, diag_offset=0, row_ids=None, col_ids=None,
                        need_dq=True, need_dkeys=True, **lse_filter):
    """(dq (N, D) or None, dkeys (M, D) or None) for the dS above; recomputes each tile."""
    masks = (exclude_diag, diag_offset, row_ids, col_ids)
    n, m = q.shape[0], keys.shape[0]
    dq = new_output(q.shape, q.dtype, q.device) if need_dq else None
    dkeys = torch.zeros_like(keys) if need_dkeys else None
    row_lse = _unreachable_to_inf(row_lse)
    if col_lse is not None:
        col_lse = _unreachable_to_inf(col_lse)
    step = _chunk_rows(q, m)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        s, s_col, _, _ = _filtered_scores(q, keys, alpha, beta, r0, r1, masks, lse_filter)
        h = torch.exp(s - row_lse[r0:r1, None]).mul_(row_grad[r0:r1, None])
        if col_lse is not None:
            h.add_(torch.exp(s_col.sub_(col_lse[None, :])).mul_(col_grad[None, :]))
        del s, s_col
        # exp(-inf - NaN) and a non-finite upstream gradient times exp(-inf) are NaN: a masked
        # entry's dS is 0 whatever the lse and the gradients (as autograd through a masked_fill).
        _fill_masked(h, 0.0, r0, r1, exclude_diag, diag_offset, row_ids, col_ids)
        h.mul_(alpha[r0:r1, None]).mul_(beta[None, :])
        if need_dq:
            torch.mm(h, keys, out=dq[r0:r1])
        if need_dkeys:
            dkeys.addmm_(h.T, q[r0:r1])
    return dq, dkeys


def masked_lse_dropped(q, keys, alpha, beta, *, exclude_diag=False, diag_offset=0, row_ids=None,
                       col_ids=None, **lse_filter):
    """int64 (N,): the candidates of each row that the false-negative filter drops; with the
    column rule (N + M,): the row counts, then the column counts."""
    masks = (exclude_diag, diag_offset, row_ids, col_ids)
    n, m = q.shape[0], keys.shape[0]
    with_cols = lse_filter.get("col_positive_row") is not None
    counts = torch.zeros(n + (m if with_cols else 0), dtype=torch.int64, device=q.device)
    if not lse_filter:
        return counts
    step = _chunk_rows(q, m)
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        _, _, rows, cols = _filtered_scores(q, keys, alpha, beta, r0, r1, masks, lse_filter)
        counts[r0:r1] = rows
        if with_cols:
            counts[n:] += cols
    return counts


# Symmetric-Gram ops (x = y = z, alpha = c beta): a documented fall-through to the full-product
# chunks above. They cost the 2 + 4 N^2 D of the full product; the saving of the symmetric tiles is
# in the C++ (csrc/cpu/gram.cpp) and Triton (kernels/gram.py) kernels.

def gram_lse_forward(z, alpha, beta, *, exclude_diag=False, row_ids=None, col_ids=None,
                     block_rows=0):
    """row_lse (N,) of s_ij = alpha_i beta_j <z_i, z_j>; ``block_rows`` is unused here."""
    del block_rows
    return masked_lse_forward(z, z, alpha, beta, exclude_diag=exclude_diag, row_ids=row_ids,
                              col_ids=col_ids)[0]


def gram_lse_backward(z, alpha, beta, row_lse, row_grad, *, exclude_diag=False, row_ids=None,
                      col_ids=None, block_rows=0):
    """dz (N, D) = dx + dy of masked_lse_backward on (z, z): z's gradient in both roles."""
    del block_rows
    dx, dy = masked_lse_backward(z, z, alpha, beta, row_lse, row_grad, exclude_diag=exclude_diag,
                                 row_ids=row_ids, col_ids=col_ids)
    return dx.add_(dy)
