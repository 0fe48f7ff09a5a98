"""Reference implementations: plain PyTorch on materialised logits.

These DEFINE correctness (tests run them in float64 as the oracle) and document the formulas.
They use O(N * M) memory; use the fused backends for real work.

InfoNCE, one row per query i (DESIGN.md section 1):
    s_ij   = <q_i, k_j> / tau            (q, k L2-normalised first when ``normalize``)
    loss_i = logsumexp_{j in C(i)} s_ij - s_{i, t_i}
where C(i) = the M keys (or only key t_i when ``in_batch_negatives`` is False), minus key i when
``exclude_self``, plus the shared negatives (K, D) or the per-query negatives (N, K, D) of row i.
"""
import torch
import torch.nn.functional as F


def reduce_loss(loss, reduction):
    """Per-row losses reduced as ``reduction``: "mean", "sum" or "none" (unchanged)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def info_nce_reference(query, key, negatives=None, *, temperature=0.07, normalize=True,
                       targets=None, in_batch_negatives=True, exclude_self=False, symmetric=False,
                       reduction="mean"):
    """InfoNCE on the full (N, M [+ K]) logits matrix; see the module docstring for the formula.

    ``symmetric``: loss_i = (row_i + col_i) / 2 with col_i = logsumexp_j s_ji - s_ii (CLIP)."""
    if normalize:
        query = F.normalize(query, dim=-1)
        key = F.normalize(key, dim=-1)
        if negatives is not None:
            negatives = F.normalize(negatives, dim=-1)
    n, m = query.shape[0], key.shape[0]
    rows = torch.arange(n, device=query.device)
    if targets is None:
        targets = rows
    logits = query @ key.T / temperature
    positive = logits[rows, targets]
    candidate = torch.ones(n, m, dtype=torch.bool, device=query.device)
    if not in_batch_negatives:
        candidate = F.one_hot(targets, m).bool()
    if exclude_self:
        candidate &= ~torch.eye(n, m, dtype=torch.bool, device=query.device)
    logits = logits.masked_fill(~candidate, float("-inf"))
    if negatives is not None:
        if negatives.dim() == 2:
            extra = query @ negatives.T / temperature
        else:
            extra = torch.einsum("nd,nkd->nk", query, negatives) / temperature
        logits = torch.cat([logits, extra], dim=1)
    loss = torch.logsumexp(logits, dim=1) - positive
    if symmetric:
        loss = 0.5 * (loss + torch.logsumexp(logits, dim=0) - positive)
    return reduce_loss(loss, reduction)


def clip_loss_reference(image, text, logit_scale, *, logit_bias=None, reduction="mean"):
    """OpenCLIP's ClipLoss: mean of cross-entropy image->text and text->image on
    logit_scale * image @ text.T (+ logit_bias, which cancels inside each softmax)."""
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(image.shape[0], device=image.device)
    per_image = F.cross_entropy(logits, labels, reduction="none")
    per_text = F.cross_entropy(logits.T, labels, reduction="none")
    return reduce_loss(0.5 * (per_image + per_text), reduction)


def siglip_loss_reference(image, text, logit_scale, logit_bias, *, reduction="mean"):
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, OpenCLIP SigLipLoss):
        z_ij = logit_scale * <image_i, text_j> + logit_bias,  y_ij = +1 if i == j else -1
        loss_i = -sum_j log sigmoid(y_ij z_ij)
    "mean" divides the total by N (OpenCLIP's normalisation), "sum" is the total, "none" the (N,)
    per-image sums."""
    logits = logit_scale * image @ text.T + logit_bias
    labels = 2 * torch.eye(image.shape[0], dtype=logits.dtype, device=logits.device) - 1
    per_image = -F.logsigmoid(labels * logits).sum(dim=1)
    return reduce_loss(per_image, reduction)
