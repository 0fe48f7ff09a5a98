"""Reference implementations: plain PyTorch on materialised logits.

These DEFINE correctness (tests run them in float64 as the oracle) and document the formulas.
They use O(N * M) memory; use the fused backends for real work.

InfoNCE, one row per query i (docs/design.md section 1):
    s_ij   = <q_i, k_j> / tau            (q, k L2-normalised first when ``normalize``)
    loss_i = logsumexp_{j in C(i)} s_ij - s_{i, t_i}
where C(i) = the M keys (or only key t_i when ``in_batch_negatives`` is False), minus key i when
``exclude_self``, plus the shared negatives (K, D) or the per-query negatives (N, K, D) of row i.
"""
import math

import torch
import torch.nn.functional as F

from ._host import reduce_loss


def info_nce_reference(query, key, negatives=None, *, temperature=0.07, normalize=True,
                       targets=None, in_batch_negatives=True, exclude_self=False, symmetric=False,
                       reduction="mean", decoupled=False, query_ids=None, negative_ids=None,
                       dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, label_smoothing=0.0,
                       query_labels=None, key_labels=None):
    """InfoNCE on the full (N, M [+ K]) logits matrix; see the module docstring for the formula.

    ``symmetric``: loss_i = (row_i + col_i) / 2 with col_i = logsumexp_j s_ji - s_ii (CLIP).
    ``decoupled`` (DCL): the positive is not a candidate. ``query_ids`` / ``negative_ids``: a
    shared negative with the query's id (>= 0) is not a candidate. ``dclw_sigma`` (DCLW) and
    ``hcl_beta`` / ``hcl_tau_plus`` (HCL): see ``contrastive_objective_reference``.
    ``label_smoothing`` eps: loss_i = lse_i - (1 - eps) s_{i,t_i} - eps mean_{j in C(i)} s_ij
    (F.cross_entropy's label smoothing with the candidates as the classes). ``query_labels`` /
    ``key_labels``: the positives of query i are the candidate keys with its label,
    loss_i = lse_i - mean_{p in P(i)} s_ip (rows without one: 0, left out of the mean;
    symmetric: (row_i + col_i) / 2, each direction's mean over its own rows)."""
    if normalize:
        query = F.normalize(query, dim=-1)
        key = F.normalize(key, dim=-1)
        if negatives is not None:
            negatives = F.normalize(negatives, dim=-1)
    n, m = query.shape[0], key.shape[0]
    rows = torch.arange(n, device=query.device)
    if targets is None:  # with labels the positives are chosen by them (targets unused)
        targets = rows if query_labels is None else torch.zeros_like(rows)
    if in_batch_negatives:
        logits = query @ key.T / temperature
        positive = logits[rows, targets]
    else:  # only the positive pairs: no product of a query with another key (and its gradient)
        positive = (query * key[targets]).sum(dim=-1) / temperature
        logits = torch.full((n, m), float("-inf"), dtype=positive.dtype, device=query.device)
        logits = logits.scatter(1, targets[:, None], positive[:, None])
    is_positive = F.one_hot(targets, m).bool()
    candidate = torch.ones(n, m, dtype=torch.bool, device=query.device)
    if not in_batch_negatives:
        candidate = is_positive.clone()
    if exclude_self:
        candidate &= ~torch.eye(n, m, dtype=torch.bool, device=query.device)
    if negatives is not None:
        if negatives.dim() == 2:
            extra = query @ negatives.T / temperature
        else:
            extra = torch.einsum("nd,nkd->nk", query, negatives) / temperature
        extra_candidate = torch.ones_like(extra, dtype=torch.bool)
        if query_ids is not None:
            same = query_ids[:, None] == negative_ids[None, :]
            extra_candidate = ~same | (query_ids[:, None] < 0)
        logits = torch.cat([logits, extra], dim=1)
        candidate = torch.cat([candidate, extra_candidate], dim=1)
        is_positive = torch.cat([is_positive, torch.zeros_like(extra_candidate)], dim=1)
    if query_labels is not None:
        return _multi_positive_reference(logits, candidate, query_labels, key_labels, m,
                                         symmetric, reduction)
    if decoupled or dclw_sigma is not None or hcl_beta != 0 or hcl_tau_plus != 0:
        candidate &= ~is_positive  # the objectives below are over the negatives alone
    # A row without any candidate (every negative masked by ids) has loss 0 and is left out of
    # the mean; its logits are replaced by zeros so that no -inf reaches a gradient.
    has_candidate = candidate.any(dim=1)
    logits = logits.masked_fill(~candidate, float("-inf")).masked_fill(~has_candidate[:, None], 0)
    if dclw_sigma is not None or hcl_beta != 0 or hcl_tau_plus != 0:
        loss = contrastive_objective_reference(
            logits, candidate, positive, temperature=temperature, decoupled=decoupled,
            dclw_sigma=dclw_sigma, cosine=positive * temperature, hcl_beta=hcl_beta,
            hcl_tau_plus=hcl_tau_plus)
    else:
        loss = torch.logsumexp(logits, dim=1) - positive
        if label_smoothing:
            loss = loss + label_smoothing * (positive - _candidate_mean(logits, candidate, 1))
        if symmetric:
            column = torch.logsumexp(logits[:, :m], dim=0) - positive
            if label_smoothing:
                column = column + label_smoothing * (
                    positive - _candidate_mean(logits[:, :m], candidate[:, :m], 0))
            loss = 0.5 * (loss + column)
    return reduce_loss(torch.where(has_candidate, loss, torch.zeros_like(loss)), reduction,
                       has_candidate)


def _multi_positive_reference(logits, candidate, query_labels, key_labels, m, symmetric,
                              reduction):
    """info_nce_reference's loss with positives by label, from the full logits."""
    positive = candidate.clone()
    positive[:, :m] &= query_labels[:, None] == key_labels[None, :]
    positive[:, m:] = False
    masked = logits.masked_fill(~candidate, float("-inf"))

    def direction(scores, allowed, positives):
        # A row without any candidate has no positive either: zeros keep -inf off its gradient.
        scores = scores.masked_fill(~allowed.any(dim=1, keepdim=True), 0)
        has_positive = positives.any(dim=1)
        loss = torch.logsumexp(scores, dim=1) - _candidate_mean(scores, positives, 1)
        return torch.where(has_positive, loss, torch.zeros_like(loss)), has_positive

    rows, row_has = direction(masked, candidate, positive)
    if not symmetric:
        return reduce_loss(rows, reduction, row_has)
    columns, column_has = direction(masked[:, :m].T, candidate[:, :m].T, positive[:, :m].T)
    if reduction == "none":
        return 0.5 * (rows + columns)
    return 0.5 * (reduce_loss(rows, reduction, row_has)
                  + reduce_loss(columns, reduction, column_has))


def _candidate_mean(logits, candidate, dim):
    """The mean of the logits over the candidates along ``dim``."""
    kept = torch.where(candidate, logits, torch.zeros_like(logits))
    return kept.sum(dim=dim) / candidate.sum(dim=dim).clamp_min(1).to(logits.dtype)


def contrastive_objective_reference(logits, is_negative, positive, *, temperature,
                                    decoupled=False, dclw_sigma=None, cosine=None, hcl_beta=0.0,
                                    hcl_tau_plus=0.0):
    """Per-row loss from the logits, the mask of the negatives and the positive s_p.

    DCLW (Yeh et al. 2022): loss_i = log sum_neg exp(s) - w_i s_p,
        w_i = 2 - N softmax_i(cosine_i / sigma)   (cosine = the positive pair's <q^, k^>)
    HCL (Robinson et al. 2021), with n_i negatives per row:
        Ng_i = (n_i sum_neg exp((1 + beta) s) / sum_neg exp(beta s) - tau_plus n_i exp(s_p))
               / (1 - tau_plus),  clamped below at n_i exp(-1 / temperature)
        loss_i = log(exp(s_p) + Ng_i) - s_p   (decoupled: log Ng_i - s_p)
    log Ng is formed in log space (relative to shift_i = max(log of the first term, s_p), the
    floor as log n_i - 1/temperature), so that nothing overflows or underflows (fp32 at
    beta = 10, temperature = 0.05 has exp(beta s) = e^200)."""
    # A row without negatives (its loss is discarded by the caller) counts its zeros instead,
    # which keeps its terms finite and its gradient 0.
    is_negative = is_negative | ~is_negative.any(dim=1, keepdim=True)

    def negatives_lse(x):
        return torch.logsumexp(x.masked_fill(~is_negative, float("-inf")), dim=1)

    if dclw_sigma is not None:
        weight = 2 - positive.shape[0] * torch.softmax(cosine / dclw_sigma, dim=0)
        return negatives_lse(logits) - weight * positive
    count = is_negative.sum(dim=1).to(positive.dtype)
    log_reweighted = count.log() + negatives_lse((1 + hcl_beta) * logits) \
        - negatives_lse(hcl_beta * logits)
    shift = torch.maximum(log_reweighted, positive)
    inner = torch.exp(log_reweighted - shift) - hcl_tau_plus * count * torch.exp(positive - shift)
    tiny = torch.finfo(inner.dtype).tiny  # inner <= 0: the floor below takes over
    log_debiased = torch.log(inner.clamp_min(tiny)) + shift - math.log1p(-hcl_tau_plus)
    inverse_temperature = 1 / torch.as_tensor(temperature).to(inner)
    log_ng = torch.maximum(log_debiased, count.log() - inverse_temperature)
    denominator = log_ng if decoupled else torch.logaddexp(positive, log_ng)
    return denominator - positive


def nt_xent_reference(z1, z2, *, temperature=0.5, normalize=True, reduction="mean",
                      label_smoothing=0.0):
    """SimCLR's NT-Xent (lightly's NTXentLoss): over the 2N views z = [z1; z2], cross-entropy of
    row i of z z^T / tau (self excluded) with target i + N (mod 2N); "none" gives (2N,).
    ``label_smoothing`` eps over the 2N - 1 other views (self is no class):
    loss_i = CE_i + eps (s_{i,t_i} - mean_{j != i} s_ij)."""
    z = torch.cat([z1, z2])
    if normalize:
        z = F.normalize(z, dim=-1)
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    loss = F.cross_entropy(logits, targets, reduction="none")
    if label_smoothing:
        others = ~torch.eye(2 * n, dtype=torch.bool, device=z.device)
        positive = logits[torch.arange(2 * n, device=z.device), targets]
        loss = loss + label_smoothing * (positive - _candidate_mean(logits, others, 1))
    return reduce_loss(loss, reduction)


def supcon_reference(features, labels=None, *, temperature=0.1, normalize=True, reduction="mean"):
    """Supervised contrastive loss L_out (Khosla et al. 2020), on the materialised matrix.

    features (N, D) with labels (N,), or (N, V, D) multi-view (labels default to the sample
    index: SimCLR). Anchor a, positives P(a) = other samples with its label, A(a) = all but a:
        loss_a = -1/|P(a)| sum_{p in P(a)} log(exp(s_ap) / sum_{b in A(a)} exp(s_ab))
    Anchors without a positive give 0 and are left out of the mean. "none": (N,) or (N, V)."""
    shape = features.shape[:-1]
    if features.dim() == 3:
        n, v = shape
        labels = torch.arange(n, device=features.device) if labels is None else labels
        labels = labels.repeat_interleave(v)
        features = features.reshape(n * v, -1)
    if normalize:
        features = F.normalize(features, dim=-1)
    r = features.shape[0]
    self_mask = torch.eye(r, dtype=torch.bool, device=features.device)
    logits = (features @ features.T / temperature).masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(dim=1)
    positive_log_prob = torch.where(positive, log_prob, torch.zeros_like(log_prob))
    loss = -positive_log_prob.sum(dim=1) / count.clamp_min(1)
    if reduction == "mean":
        return loss.sum() / (count > 0).sum().clamp_min(1)
    return reduce_loss(loss, reduction).reshape(shape) if reduction == "none" else loss.sum()


def clip_loss_reference(image, text, logit_scale, *, logit_bias=None, reduction="mean",
                        label_smoothing=0.0):
    """OpenCLIP's ClipLoss: mean of cross-entropy image->text and text->image on
    logit_scale * image @ text.T (+ logit_bias, which cancels inside each softmax), each with
    F.cross_entropy's ``label_smoothing``."""
    logits = logit_scale * image @ text.T
    if logit_bias is not None:
        logits = logits + logit_bias
    labels = torch.arange(image.shape[0], device=image.device)
    per_image = F.cross_entropy(logits, labels, reduction="none", label_smoothing=label_smoothing)
    per_text = F.cross_entropy(logits.T, labels, reduction="none",
                               label_smoothing=label_smoothing)
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


def distill_info_nce_reference(student_query, student_key, teacher_query, teacher_key, *,
                               temperature, teacher_temperature, symmetric=True, normalize=True,
                               reduction="mean"):
    """Similarity distillation on the materialised score matrices (OpenCLIP's DistillClipLoss
    distillation term at normalize=False, temperature = 1 / logit_scale):
        s = q^S k^S^T / temperature,  t = q^T k^T^T / teacher_temperature  (rows L2-normalised
        first when ``normalize``; the teacher detached: it gets no gradient)
        loss_i = -sum_j softmax(t_i.)_j log_softmax(s_i.)_j
    ``symmetric`` (N == M): loss_i = (row_i + col_i) / 2, col_i the same on the transposes."""
    if normalize:
        student_query, student_key = (F.normalize(student_query, dim=-1),
                                      F.normalize(student_key, dim=-1))
        teacher_query, teacher_key = (F.normalize(teacher_query, dim=-1),
                                      F.normalize(teacher_key, dim=-1))
    s = student_query @ student_key.T / temperature
    t = (teacher_query @ teacher_key.T / teacher_temperature).detach()

    def soft_cross_entropy(teacher, student):
        return -(teacher.softmax(dim=1) * student.log_softmax(dim=1)).sum(dim=1)

    loss = soft_cross_entropy(t, s)
    if symmetric:
        loss = 0.5 * (loss + soft_cross_entropy(t.T, s.T))
    return reduce_loss(loss, reduction)


def distill_clip_loss_reference(student_image, student_text, teacher_image, teacher_text,
                                logit_scale, teacher_logit_scale, *, reduction="mean"):
    """OpenCLIP's DistillClipLoss on the materialised logits, (contrastive, distill) stacked
    ((2,), or (2, N) for "none"): s = logit_scale x y^T, contrastive_i = (CE(s_i., i) +
    CE(s_.i, i)) / 2, distill = distill_info_nce_reference(symmetric, normalize=False) with
    temperature 1 / logit_scale (the teacher detached)."""
    s = logit_scale * student_image @ student_text.T
    targets = torch.arange(s.shape[0], device=s.device)
    contrastive = 0.5 * (F.cross_entropy(s, targets, reduction="none")
                         + F.cross_entropy(s.T, targets, reduction="none"))
    distill = distill_info_nce_reference(
        student_image, student_text, teacher_image, teacher_text,
        temperature=1 / logit_scale, teacher_temperature=1 / teacher_logit_scale,
        symmetric=True, normalize=False, reduction="none")
    return torch.stack([reduce_loss(contrastive, reduction), reduce_loss(distill, reduction)])
