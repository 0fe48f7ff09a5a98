"""The oracle of false-negative filtering (fastcontrast/infonce/false_negatives.py): the full
similarity matrix and the guide's, the drop mask materialised, in the inputs' dtype (the tests
call it on float64 inputs).

    drop_ij = j != t_i and (sim_ij > sim_{i,t_i} + margin or guide_ij > thr_i),
    loss_i  = logsumexp_{j candidate, not dropped} sim_ij / tau - sim_{i,t_i} / tau
symmetric (CLIP): (row_i + col_i) / 2, the columns filtered with their own positive."""
import torch
import torch.nn.functional as F

from ._host import reduce_loss

__all__ = ["false_negatives_reference"]


def _direction(query, key, negatives, temperature, normalize, targets, in_batch_negatives,
               query_ids, negative_ids, fn):
    """(per-row loss (N,), dropped counts (N,)) of one direction."""
    if normalize:
        query, key = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        negatives = None if negatives is None else F.normalize(negatives, dim=-1)
    n = query.shape[0]
    rows = torch.arange(n, device=query.device)
    targets = rows if targets is None else targets
    positive_key = key[targets]
    if in_batch_negatives:
        sims, positive_col = [query @ key.T], targets
    else:  # the positive is the only in-batch candidate: column 0
        sims, positive_col = [(query * positive_key).sum(-1, keepdim=True)], torch.zeros_like(rows)
    candidate = [torch.ones_like(sims[0], dtype=torch.bool)]
    if negatives is not None:
        sims.append(query @ negatives.T)
        same = torch.zeros(n, negatives.shape[0], dtype=torch.bool, device=query.device)
        if query_ids is not None:
            same = (query_ids[:, None] == negative_ids[None, :]) & (query_ids[:, None] >= 0)
        candidate.append(~same)
    sim, candidate = torch.cat(sims, dim=1), torch.cat(candidate, dim=1)
    positive = sim[rows, positive_col]
    drop = torch.zeros_like(candidate)
    if fn.margin is not None:
        drop |= sim > positive[:, None] + fn.margin
    if fn.guide_query is not None:
        unit = [None if t is None else F.normalize(t.to(query.dtype), dim=-1)
                for t in (fn.guide_query, fn.guide_key, fn.guide_bank)]
        gq, gk, gbank = unit
        guide_positive = (gq * gk[targets]).sum(-1)
        guide = [gq @ gk.T] if in_batch_negatives else [guide_positive[:, None]]
        if gbank is not None:
            guide.append(gq @ gbank.T)
        guide = torch.cat(guide, dim=1)
        if fn.guide_strategy == "absolute":
            threshold = guide_positive - fn.guide_margin
        else:
            threshold = guide_positive - guide_positive.abs() * fn.guide_margin
        drop |= guide > threshold[:, None]
    drop[rows, positive_col] = False
    drop &= candidate
    logits = (sim / temperature).masked_fill(~candidate | drop, float("-inf"))
    return torch.logsumexp(logits, dim=1) - logits[rows, positive_col], drop.sum(dim=1)


def false_negatives_reference(query, key, negatives=None, *, temperature, normalize=True,
                              targets=None, in_batch_negatives=True, symmetric=False,
                              reduction="mean", query_ids=None, negative_ids=None,
                              false_negatives, return_dropped=False):
    """info_nce's loss under FalseNegatives filter ``false_negatives`` on materialised matrices;
    with ``return_dropped`` (loss, counts): counts (N,) int64, symmetric (2, N)."""
    fn = false_negatives
    loss, counts = _direction(query, key, negatives, temperature, normalize, targets,
                              in_batch_negatives, query_ids, negative_ids, fn)
    if symmetric:
        col_loss, col_counts = _direction(key, query, None, temperature, normalize, None, True,
                                          None, None, fn.transposed())
        loss, counts = 0.5 * (loss + col_loss), torch.stack([counts, col_counts])
    loss = reduce_loss(loss, reduction)
    return (loss, counts) if return_dropped else loss
