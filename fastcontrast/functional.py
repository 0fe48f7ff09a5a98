"""Public functional API: argument validation, then the op module of the loss family.

    info_nce    loss_i = logsumexp_{j in C(i)} <q_i, k_j>/tau - <q_i, k_{t_i}>/tau
                (docs/design.md section 1); options: DCL / DCLW (decoupled, dclw_sigma),
                HCL (hcl_beta, hcl_tau_plus) (docs/design.md section 4)
    clip_loss   symmetric info_nce with tau = 1 / logit_scale, no normalisation (OpenCLIP)
    nt_xent     SimCLR: info_nce over the 2N views [z1; z2], positive of view i is view i +- N
    supcon      Khosla et al. L_out: positives = the other samples with the same label
    moco_loss   info_nce(query, key, queue, in_batch_negatives=False)
    siglip_loss SigLIP's pairwise sigmoid loss
    distill_info_nce  similarity distillation: the student's softmax against the teacher's
    distill_clip_loss OpenCLIP's DistillClipLoss: (CLIP loss, distillation term) in one pass

Each function validates its arguments (fastcontrast._loss_args: one check per loss, shared with
fastcontrast.distributed, so both layers raise the same errors), resolves ``backend`` once
(fastcontrast.backends) and calls the oracle (backend="reference", fastcontrast.reference) or
its op family's module (fastcontrast.infonce, fastcontrast.siglip), whose registered ops run the
kernels.

Under torch.compile (and for meta tensors) the checks that would read tensor values (a positive
temperature tensor, targets in range, targets[i] != i with exclude_self) are skipped: reading a
value forces a device sync and a graph break. Out-of-range targets then fail in index_select.
"""
import torch

from . import _loss_args as args
from ._false_negative_args import clip_filter, info_nce_filter, moco_filter
from ._false_negatives_reference import false_negatives_reference
from ._loss_args import output_dtype_policy
from .backends import available_backends, resolve
from .distill import distill_fused_loss
from .distill_clip import distill_clip_fused_loss
from .infonce import InfoNCEOptions, info_nce_loss, supcon_loss
from .infonce.matryoshka import matryoshka_args, matryoshka_info_nce
from .reference import (distill_clip_loss_reference, distill_info_nce_reference,
                        info_nce_reference, siglip_loss_reference, supcon_reference)
from .siglip import siglip_fused_loss

__all__ = ["info_nce", "clip_loss", "nt_xent", "supcon", "moco_loss", "siglip_loss",
           "distill_info_nce", "distill_clip_loss", "available_backends"]


@output_dtype_policy
def info_nce(query, key, negatives=None, *, temperature=0.07, normalize=True, targets=None,
             in_batch_negatives=True, exclude_self=False, symmetric=False, reduction="mean",
             decoupled=False, dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, query_ids=None,
             negative_ids=None, label_smoothing=0.0, query_labels=None, key_labels=None,
             matryoshka_dims=None, matryoshka_weights=None, false_negative_margin=None,
             guide=None, guide_margin=0.0, guide_margin_strategy="absolute",
             return_dropped=False, backend="auto"):
    """InfoNCE / NT-Xent style contrastive loss, fused (never materialises the N x M logits).

    loss_i = logsumexp_{j in C(i)} s_ij - s_{i, t_i},  s_ij = <q_i, k_j> / temperature
    (q, k, negatives L2-normalised first when ``normalize``). C(i): the M keys (only key t_i when
    ``in_batch_negatives`` is False) minus key i when ``exclude_self``, plus ``negatives``: a
    shared bank (K, D) or per-query negatives (N, K, D). ``targets`` (N,) int64: positive key of
    each query (default i, needs M == N). ``symmetric``: mean of query->key and key->query.
    ``temperature``: float or 0-dim tensor (exact gradient). ``reduction``: mean | sum | none.

    Objectives (fused into the same kernels; see fastcontrast.infonce for the formulas):
    ``decoupled`` DCL, the positive is removed from the denominator; ``dclw_sigma`` DCLW, the
    positive weighted by w_i = 2 - N softmax(cos_i / sigma) (needs decoupled); ``hcl_beta``,
    ``hcl_tau_plus`` HCL, hard-negative reweighting exp(beta s) and debiasing with class prior
    tau_plus. ``query_ids`` (N,) / ``negative_ids`` (K,) int64: a shared negative whose id equals
    the query's (>= 0) is not a candidate (e.g. the same instance still in a MoCo queue).
    ``label_smoothing`` eps in [0, 1]: loss_i = (1 - eps)(lse_i - s_{i,t_i})
    + eps (lse_i - mean_{j in C(i)} s_ij), F.cross_entropy's label smoothing with the candidates
    as the classes (from sums of keys; not with DCL / DCLW / HCL). ``query_labels`` (N,) /
    ``key_labels`` (M,) int64: multiple positives, every key with the query's label:
    loss_i = lse_i - mean_{p in P(i)} s_ip (targets None; rows without a positive give 0 and
    are left out of the mean; symmetric: both directions, e.g. CLIP with repeated captions).
    ``matryoshka_dims`` (d_1 < ... < d_P <= D) with optional ``matryoshka_weights`` (default
    ones): loss = sum_p w_p loss(query[:, :d_p], key[:, :d_p]), each prefix normalised on its own
    (sentence-transformers' MatryoshkaLoss), all prefixes in one pass over the key tiles
    (fastcontrast/infonce/matryoshka.py; with targets, exclude_self, symmetric and a bank).
    False-negative filtering (fastcontrast/infonce/false_negatives.py), plain InfoNCE with a
    shared bank at most: ``false_negative_margin`` m >= 0 drops every candidate j != t_i with
    <q^_i, k^_j> > <q^_i, k^_{t_i}> + m (Qwen3-Embedding); ``guide`` = (guide_query (N, G),
    guide_key (M, G)[, guide_negatives (K, G) with negatives]) drops every j != t_i with
    cos(gq_i, gk_j) > cos(gq_i, gk_{t_i}) - guide_margin ("absolute") or
    ... - |cos(gq_i, gk_{t_i})| guide_margin ("relative") (GISTEmbedLoss). ``return_dropped``:
    returns (loss, dropped), dropped int64 (N,) candidates dropped per row (symmetric: (2, N),
    row 0 query -> key, row 1 key -> query).
    """
    tau = args.info_nce_args(
        query, key, negatives, temperature=temperature, normalize=normalize, targets=targets,
        in_batch_negatives=in_batch_negatives, exclude_self=exclude_self, symmetric=symmetric,
        reduction=reduction, decoupled=decoupled, dclw_sigma=dclw_sigma, hcl_beta=hcl_beta,
        hcl_tau_plus=hcl_tau_plus, query_ids=query_ids, negative_ids=negative_ids,
        label_smoothing=label_smoothing, query_labels=query_labels, key_labels=key_labels)
    dims, weights = matryoshka_args(matryoshka_dims, matryoshka_weights, query.shape[-1])
    fn = info_nce_filter(
        query, key, negatives, exclude_self=exclude_self, symmetric=symmetric,
        objectives=decoupled or dclw_sigma is not None or hcl_beta != 0 or hcl_tau_plus != 0,
        label_smoothing=label_smoothing, labels=query_labels is not None, matryoshka=bool(dims),
        false_negative_margin=false_negative_margin, guide=guide, guide_margin=guide_margin,
        guide_margin_strategy=guide_margin_strategy, return_dropped=return_dropped)
    options = InfoNCEOptions(resolve(backend, query.device, dtype=query.dtype),
                             in_batch_negatives=in_batch_negatives, exclude_self=exclude_self,
                             symmetric=symmetric, normalize=normalize, reduction=reduction,
                             decoupled=decoupled, dclw_sigma=dclw_sigma, hcl_beta=hcl_beta,
                             hcl_tau_plus=hcl_tau_plus, label_smoothing=label_smoothing,
                             matryoshka_dims=dims, matryoshka_weights=weights)
    return _info_nce(options, query, key, negatives, tau, tau.reciprocal(), targets, query_ids,
                     negative_ids, labels=(query_labels, key_labels), false_negatives=fn,
                     return_dropped=return_dropped)


def _info_nce(options, query, key, negatives, temperature, scale, targets, query_ids=None,
              negative_ids=None, labels=(None, None), false_negatives=None,
              return_dropped=False):
    """The validated call: the oracle (at ``temperature``), or the fused op module (at
    ``scale`` = 1 / temperature)."""
    if options.matryoshka_dims:
        return matryoshka_info_nce(options, query, key, negatives, temperature, scale, targets,
                                   query_ids, labels)
    if options.backend == "reference" and false_negatives is not None:
        return false_negatives_reference(
            query, key, negatives, temperature=temperature, normalize=options.normalize,
            targets=targets, in_batch_negatives=options.in_batch_negatives,
            symmetric=options.symmetric, reduction=options.reduction, query_ids=query_ids,
            negative_ids=negative_ids, false_negatives=false_negatives,
            return_dropped=return_dropped)
    if options.backend == "reference":
        return info_nce_reference(
            query, key, negatives, temperature=temperature, normalize=options.normalize,
            targets=targets, in_batch_negatives=options.in_batch_negatives,
            exclude_self=options.exclude_self, symmetric=options.symmetric,
            reduction=options.reduction, decoupled=options.decoupled, query_ids=query_ids,
            negative_ids=negative_ids, dclw_sigma=options.dclw_sigma, hcl_beta=options.hcl_beta,
            hcl_tau_plus=options.hcl_tau_plus, label_smoothing=options.label_smoothing,
            query_labels=labels[0], key_labels=labels[1])
    bank = negatives if negatives is not None and negatives.dim() == 2 else None
    per_query = negatives if negatives is not None and negatives.dim() == 3 else None
    return info_nce_loss(options, query, key, scale=scale, bank=bank, per_query=per_query,
                         targets=targets, query_ids=query_ids, bank_ids=negative_ids,
                         query_labels=labels[0], key_labels=labels[1],
                         false_negatives=false_negatives, return_dropped=return_dropped)


@output_dtype_policy
def nt_xent(z1, z2, *, temperature=0.5, normalize=True, reduction="mean", decoupled=False,
            dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, label_smoothing=0.0,
            matryoshka_dims=None, matryoshka_weights=None, backend="auto"):
    """SimCLR's NT-Xent over the 2N views z = [z1; z2] (lightly's NTXentLoss):
    loss_i = logsumexp_{j != i} <z_i, z_j>/tau - <z_i, z_{i+-N}>/tau, mean over the 2N rows
    ("none": (2N,), rows of z1 first). DCL / DCLW / HCL and label_smoothing (the 2N - 1 other
    views are the classes) and matryoshka_dims / matryoshka_weights as in info_nce."""
    tau = args.nt_xent_args(z1, z2, temperature=temperature, normalize=normalize,
                            reduction=reduction, decoupled=decoupled, dclw_sigma=dclw_sigma,
                            hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                            label_smoothing=label_smoothing)
    dims, weights = matryoshka_args(matryoshka_dims, matryoshka_weights, z1.shape[-1])
    n = z1.shape[0]
    views = torch.cat([z1, z2])
    targets = (torch.arange(2 * n, device=z1.device) + n) % (2 * n)
    # targets[targets[i]] == i: the positive mask is symmetric (InfoNCEOptions).
    options = InfoNCEOptions(resolve(backend, z1.device, dtype=z1.dtype), exclude_self=True,
                             normalize=normalize, reduction=reduction, decoupled=decoupled,
                             dclw_sigma=dclw_sigma, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                             involutive_targets=True, label_smoothing=label_smoothing,
                             matryoshka_dims=dims, matryoshka_weights=weights)
    return _info_nce(options, views, views, None, tau, tau.reciprocal(), targets)


@output_dtype_policy
def supcon(features, labels=None, *, temperature=0.1, normalize=True, reduction="mean",
           backend="auto"):
    """Supervised contrastive loss L_out (Khosla et al. 2020), fused.

    features (N, D) with labels (N,) int64, or (N, V, D) multi-view features (labels (N,) or None:
    then each sample is its own class, i.e. SimCLR over V views). For anchor a with label c:
        loss_a = logsumexp_{b != a} s_ab - mean_{p != a, label_p = c} s_ap,  s = <z^_a, z^_b> / tau
    Anchors without a positive give 0 and are left out of the mean. "none": (N,) or (N, V).
    Positives are summed per class (no N x N mask); the denominator is the fused log-sum-exp."""
    tau = args.supcon_args(features, labels, temperature, reduction, normalize)
    n = features.shape[0]
    name = resolve(backend, features.device, dtype=features.dtype)
    if name == "reference":
        return supcon_reference(features, labels, temperature=tau, normalize=normalize,
                                reduction=reduction)
    shape = features.shape[:-1]
    if features.dim() == 3:
        labels = torch.arange(n, device=features.device) if labels is None else labels
        labels = labels.repeat_interleave(features.shape[1])
        features = features.reshape(-1, features.shape[-1])
    loss = supcon_loss(features, labels, tau.reciprocal(), normalize=normalize,
                       reduction=reduction, backend=name)
    return loss.reshape(shape) if reduction == "none" else loss


@output_dtype_policy
def moco_loss(query, key, queue, *, temperature=0.07, normalize=True, reduction="mean",
              query_index=None, decoupled=False, hcl_beta=0.0, hcl_tau_plus=0.0,
              label_smoothing=0.0, false_negative_margin=None, guide=None, guide_margin=0.0,
              guide_margin_strategy="absolute", return_dropped=False, backend="auto"):
    """MoCo's InfoNCE:
        loss_i = -log(e^{<q_i, k_i>/tau} / (e^{<q_i, k_i>/tau} + sum_j e^{<q_i, u_j>/tau}))
    with the queue entries u_j (K, D) as the only negatives (info_nce with
    in_batch_negatives=False). ``queue``: a (K, D) tensor or a NegativeQueue (its filled part).
    ``query_index`` (N,) int64: sample ids of the batch; queue entries stored with the same id
    (a NegativeQueue with store_indices=True) are not negatives. DCL / HCL options and
    label_smoothing (the positive and the queue entries are the classes) as in info_nce.
    False-negative filtering of the queue entries as in info_nce: ``false_negative_margin``,
    ``guide`` = (guide_query (N, G), guide_key (N, G), guide_queue (K, G)), ``guide_margin``,
    ``guide_margin_strategy``, ``return_dropped`` ((loss, dropped (N,)))."""
    queue, negative_ids = args.unwrap_queue(queue, query_index)
    tau = args.moco_loss_args(query, key, queue, negative_ids, temperature=temperature,
                              normalize=normalize, reduction=reduction, query_index=query_index,
                              decoupled=decoupled, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                              label_smoothing=label_smoothing)
    fn = moco_filter(query, key, queue,
                     objectives=decoupled or hcl_beta != 0 or hcl_tau_plus != 0,
                     label_smoothing=label_smoothing,
                     false_negative_margin=false_negative_margin, guide=guide,
                     guide_margin=guide_margin, guide_margin_strategy=guide_margin_strategy,
                     return_dropped=return_dropped)
    options = InfoNCEOptions(resolve(backend, query.device, dtype=query.dtype),
                             in_batch_negatives=False, normalize=normalize, reduction=reduction,
                             decoupled=decoupled, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                             label_smoothing=label_smoothing)
    return _info_nce(options, query, key, queue, tau, tau.reciprocal(), None, query_index,
                     negative_ids, false_negatives=fn, return_dropped=return_dropped)


@output_dtype_policy
def clip_loss(image, text, logit_scale, *, logit_bias=None, reduction="mean", label_smoothing=0.0,
              labels=None, matryoshka_dims=None, matryoshka_weights=None,
              false_negative_margin=None, guide=None, guide_margin=0.0,
              guide_margin_strategy="absolute", return_dropped=False, backend="auto"):
    """OpenCLIP's ClipLoss: (CE(image -> text) + CE(text -> image)) / 2 on
    logit_scale * image @ text.T, pair i the positive. Features are used as given (CLIP models
    normalise them). ``logit_bias`` shifts every logit of a softmax equally, so it cancels: it is
    accepted for API compatibility and receives a zero gradient. ``label_smoothing`` eps: each
    cross-entropy with F.cross_entropy's label_smoothing=eps (fused, from sums of features).
    ``labels`` (N,) int64: multiple positives (repeated captions): image i and text j are a
    positive pair iff labels match; each direction is lse - the mean over its positives
    (info_nce's query_labels = key_labels = labels). ``matryoshka_dims`` / ``matryoshka_weights``:
    sum_p w_p ClipLoss(image[:, :d_p], text[:, :d_p]) (prefixes as given, not renormalised), in
    one pass over the tiles (as info_nce's). False-negative filtering as in info_nce,
    each direction with its own positive: ``false_negative_margin`` m in raw inner products
    (<image_i, text_j> > <image_i, text_i> + m; the features are not normalised here),
    ``guide`` = (guide_image (N, G), guide_text (N, G)), ``guide_margin``,
    ``guide_margin_strategy``; ``return_dropped``: (loss, dropped (2, N)), row 0 image -> text,
    row 1 text -> image."""
    scale = args.clip_loss_args(image, text, logit_scale, logit_bias, reduction, label_smoothing,
                                labels)
    dims, weights = matryoshka_args(matryoshka_dims, matryoshka_weights, image.shape[-1])
    fn = clip_filter(image, text, label_smoothing=label_smoothing, labels=labels is not None,
                     matryoshka=bool(dims), false_negative_margin=false_negative_margin,
                     guide=guide, guide_margin=guide_margin,
                     guide_margin_strategy=guide_margin_strategy, return_dropped=return_dropped)
    name = resolve(backend, image.device, dtype=image.dtype)
    options = InfoNCEOptions(name, normalize=False, symmetric=True, reduction=reduction,
                             label_smoothing=label_smoothing, matryoshka_dims=dims,
                             matryoshka_weights=weights)
    out = _info_nce(options, image, text, None, scale.reciprocal(), scale, None,
                    labels=(labels, labels), false_negatives=fn, return_dropped=return_dropped)
    loss, dropped = out if return_dropped else (out, None)
    if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
        # Keep logit_bias in the graph (zero gradient) without promoting the loss's dtype.
        loss = loss + (0.0 * logit_bias.sum()).to(loss.dtype)
    return (loss, dropped) if return_dropped else loss


@output_dtype_policy
def siglip_loss(image, text, logit_scale, logit_bias, *, reduction="mean", backend="auto"):
    """SigLIP's pairwise sigmoid loss, fused (never materialises the N x N logits).

    loss_i = -sum_j log sigmoid(y_ij z_ij),  z_ij = logit_scale <image_i, text_j> + logit_bias,
    y_ij = +1 if i == j else -1. image, text: (N, D), same dtype and device, used as given (no
    normalisation). logit_scale, logit_bias: finite floats or 0-dim tensors (exact gradients when
    they require grad). reduction: "mean" (total / N, as OpenCLIP), "sum", or "none" ((N,)).
    backend: "auto", "reference", "torch", "cpu", "triton" (float16 / bfloat16 / float32 only).
    """
    scale, bias = args.siglip_loss_args(image, text, logit_scale, logit_bias, reduction)
    name = resolve(backend, image.device, dtype=image.dtype)
    if name == "reference":
        return siglip_loss_reference(image, text, scale, bias, reduction=reduction)
    return siglip_fused_loss(image, text, scale, bias, reduction=reduction, backend=name)


@output_dtype_policy
def distill_info_nce(student_query, student_key, teacher_query, teacher_key, *, temperature,
                     teacher_temperature, symmetric=True, normalize=True, reduction="mean",
                     backend="auto"):
    """Similarity distillation, fused: the student's softmax over the keys is trained towards
    the teacher's (OpenCLIP's DistillClipLoss distillation term, CLIP-KD, MobileCLIP).

        s_ij = <q^S_i, k^S_j> / temperature,   t_ij = <q^T_i, k^T_j> / teacher_temperature
        loss_i = sum_j p^T_ij (logsumexp_j s_ij - s_ij),   p^T_ij = softmax_j(t_ij)

    (rows L2-normalised first when ``normalize``), the cross-entropy of the teacher's
    distribution against the student's: CLIP-KD's KL plus the teacher's entropy, a constant.
    student_query (N, D), student_key (M, D), teacher_query (N, DT), teacher_key (M, DT): one
    floating dtype and device; the teacher's feature dim DT may differ from D. ``symmetric``
    (N == M): loss_i = (row_i + col_i) / 2 with col_i the key -> query direction (the mean
    is OpenCLIP's (row mean + column mean) / 2). Temperatures: positive floats or 0-dim tensors;
    a CLIP model passes temperature=1 / logit_scale, teacher_temperature=1 / teacher scale
    (and normalize=False: CLIP features are unit already; the student's temperature tensor gets
    its exact gradient). The teacher gets no gradient: teacher features and
    teacher_temperature are detached (their .grad stays None). ``reduction``: mean | sum |
    none ((N,)). Both score matrices are recomputed in tiles, forward and backward: memory
    O(N + M) beyond the inputs.
    """
    tau, teacher_tau = args.distill_args(
        student_query, student_key, teacher_query, teacher_key, temperature=temperature,
        teacher_temperature=teacher_temperature, symmetric=symmetric, normalize=normalize,
        reduction=reduction)
    name = resolve(backend, student_query.device, dtype=student_query.dtype)
    if name == "reference":
        return distill_info_nce_reference(
            student_query, student_key, teacher_query, teacher_key, temperature=tau,
            teacher_temperature=teacher_tau, symmetric=symmetric, normalize=normalize,
            reduction=reduction)
    return distill_fused_loss(student_query, student_key, teacher_query, teacher_key,
                              tau.reciprocal(), teacher_tau.reciprocal(), symmetric=symmetric,
                              normalize=normalize, reduction=reduction, backend=name)


@output_dtype_policy
def _distill_clip_stacked(student_image, student_text, teacher_image, teacher_text, logit_scale,
                          teacher_logit_scale, reduction, backend):
    """distill_clip_loss's two terms stacked, so that the output dtype policy treats both."""
    scale, teacher_scale = args.distill_clip_args(student_image, student_text, teacher_image,
                                                  teacher_text, logit_scale,
                                                  teacher_logit_scale, reduction)
    name = resolve(backend, student_image.device, dtype=student_image.dtype)
    if name == "reference":
        return distill_clip_loss_reference(student_image, student_text, teacher_image.detach(),
                                           teacher_text.detach(), scale,
                                           teacher_scale.detach(), reduction=reduction)
    return distill_clip_fused_loss(student_image, student_text, teacher_image, teacher_text,
                                   scale, teacher_scale, reduction=reduction, backend=name)


def distill_clip_loss(student_image, student_text, teacher_image, teacher_text, logit_scale,
                      teacher_logit_scale, *, reduction="mean", backend="auto"):
    """OpenCLIP's DistillClipLoss, fused: returns (contrastive_loss, distill_loss), both terms
    from ONE pass over the student's and the teacher's score tiles (never materialised).

        s_ij = logit_scale <x_i, y_j>,   t_ij = teacher_logit_scale <x^T_i, y^T_j>
        contrastive = (CE(s_i., i) + CE(s_.i, i)) / 2                      (clip_loss)
        distill     = (H(softmax(t_i.), softmax(s_i.)) + H(softmax(t_.i), softmax(s_.i))) / 2
                      H(p, q) = -sum_j p_j log q_j                  (distill_info_nce, symmetric)

    each a mean over the N pairs ("sum": the sum, "none": (N,) per pair), so the mean values
    are OpenCLIP's ``contrastive_loss`` and ``distill_loss`` on the same inputs. The two share
    the student's log-sum-exps: the cost is that of distill_info_nce alone, not of
    clip_loss + distill_info_nce (fastcontrast/distill_clip.py). student_image, student_text
    (N, D), teacher_image, teacher_text (N, DT): one floating dtype and device, used as given
    (CLIP models normalise them). logit_scale, teacher_logit_scale: positive finite floats or
    0-dim tensors; logit_scale gets its exact gradient. The teacher gets no gradient (its
    features and scale are detached). Each returned term can be logged on its own and the sum
    (or any weighting) backpropagated."""
    out = _distill_clip_stacked(student_image, student_text, teacher_image, teacher_text,
                                logit_scale, teacher_logit_scale, reduction, backend)
    return out[0], out[1]
