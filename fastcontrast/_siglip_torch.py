"""The "torch" backend of SigLIP's sigmoid loss: pure PyTorch, row chunk by row chunk, with a
recomputing backward. Bounded memory on any device, no compiler needed.

    z_ij = scale <x_i, y_j> + bias,  t_ij = -y_ij z_ij  (y_ij = +1 iff i == j: the diagonal flips)
    forward:  loss_i = sum_j softplus(t_ij)
    backward: dz_ij = -g_i y_ij sigmoid(t_ij);  gx_i = sum_j dz_ij y_j,  gy_j = sum_i dz_ij x_i,
              dz_total = sum_ij dz_ij
Only one (rows, M) chunk of t exists at a time (the chunk size policy of the InfoNCE torch
backend, FASTCONTRAST_TORCH_CHUNK_ELEMENTS included).
"""
import torch
import torch.nn.functional as F

from ._torch_chunked import _chunk_rows, new_output


def _signed_logits(x, y, scale, bias, r0, r1):
    """t = -y_ij z_ij for rows r0..r1: z on the chunk, the positives (j == i) negated."""
    t = torch.mm(x[r0:r1], y.T).mul_(scale).add_(bias)
    t.diagonal(offset=r0).neg_()  # entries (i - r0, i) for the rows that have a matching text
    return t


def siglip_forward(x, y, scale, bias):
    """Per-row loss (N,) in x's dtype; scale and bias are 0-dim tensors of that dtype."""
    n = x.shape[0]
    loss = new_output(n, x.dtype, x.device)
    step = _chunk_rows(x, y.shape[0])
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        # softplus(t) = -log sigmoid(-t), exact for any |t| (F.softplus switches to t above 20).
        loss[r0:r1] = F.logsigmoid(_signed_logits(x, y, scale, bias, r0, r1).neg_()).sum(1).neg_()
    return loss


def siglip_backward(x, y, scale, bias, row_grad, *, need_gx=True, need_gy=True):
    """(gx (N, D) or None, gy (M, D) or None, dz_total 0-dim), recomputing each chunk."""
    n = x.shape[0]
    gx = new_output(x.shape, x.dtype, x.device) if need_gx else None
    gy = torch.zeros_like(y) if need_gy else None
    dz_total = torch.zeros((), dtype=x.dtype, device=x.device)
    step = _chunk_rows(x, y.shape[0])
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        dz = _signed_logits(x, y, scale, bias, r0, r1).sigmoid_().mul_(row_grad[r0:r1, None])
        dz.diagonal(offset=r0).neg_()  # d t / d z = -y_ij
        dz_total += dz.sum()
        if need_gx:
            torch.mm(dz, y, out=gx[r0:r1])
        if need_gy:
            gy.addmm_(dz.T, x[r0:r1])
    return gx, gy, dz_total
