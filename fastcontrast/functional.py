"""Public functional API: argument validation, then the op module of the loss family.

    info_nce    loss_i = logsumexp_{j in C(i)} <q_i, k_j>/tau - <q_i, k_{t_i}>/tau
                (docs/design.md section 1); options: DCL / DCLW (decoupled, dclw_sigma),
                HCL (hcl_beta, hcl_tau_plus) (docs/design.md section 4)
    clip_loss   symmetric info_nce with tau = 1 / logit_scale, no normalisation (OpenCLIP)
    nt_xent     SimCLR: info_nce over the 2N views [z1; z2], positive of view i is view i +- N
    supcon      Khosla et al. L_out: positives = the other samples with the same label
    moco_loss   info_nce(query, key, queue, in_batch_negatives=False)
    siglip_loss SigLIP's pairwise sigmoid loss

Each function validates its arguments, resolves ``backend`` once (fastcontrast.backends) and calls
the oracle (backend="reference", fastcontrast.reference) or its op family's module
(fastcontrast.infonce, fastcontrast.siglip), whose registered ops run the kernels.

Under torch.compile (and for meta tensors) the checks that would read tensor values (a positive
temperature tensor, targets in range, targets[i] != i with exclude_self) are skipped: reading a
value forces a device sync and a graph break. Out-of-range targets then fail in index_select.
"""
import functools

import torch

from . import _validation as check
from .backends import available_backends, resolve
from .infonce import InfoNCEOptions, info_nce_loss, supcon_loss
from .reference import info_nce_reference, siglip_loss_reference, supcon_reference
from .siglip import siglip_fused_loss

__all__ = ["info_nce", "clip_loss", "nt_xent", "supcon", "moco_loss", "siglip_loss",
           "available_backends"]


def _autocast_policy(loss_fn):
    """Output dtype and autocast policy of every public loss. The op modules return the loss in
    the precision they accumulate in (float32 for float16 / bfloat16 inputs); it is cast to the
    dtype of the first tensor argument, except under torch.autocast: there the loss runs with
    autocast disabled, so the inputs keep their dtype (float32 is not downcast; low-precision
    kernels still accumulate in float32), and it is returned in float32 (float64 inputs:
    float64) without the low-precision rounding, as autocast's float32 ops (F.cross_entropy)."""

    @functools.wraps(loss_fn)
    def wrapper(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None or not first.is_floating_point():  # validation raises
            return loss_fn(*args, **kwargs)
        device = first.device.type
        if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
            return loss_fn(*args, **kwargs).to(first.dtype)
        with torch.autocast(device, enabled=False):
            loss = loss_fn(*args, **kwargs)
        return loss if loss.dtype == torch.float64 else loss.float()

    return wrapper


def _validate_info_nce(query, key, negatives, targets, in_batch_negatives, exclude_self,
                       symmetric, normalize, reduction):
    check.check_tensor("query", query, (2,))
    check.check_tensor("key", key, (2,))
    check.check_same("key", key, "query", query)
    n, d = query.shape
    m = key.shape[0]
    check.check_feature_dim("key", key, d)
    check.check_tensor("negatives", negatives, (2, 3), optional=True)
    if negatives is not None:
        check.check_same("negatives", negatives, "query", query)
        check.check_feature_dim("negatives", negatives, d)
        if negatives.dim() == 3 and negatives.shape[0] != n:
            raise ValueError(f"per-query negatives must have shape (N={n}, K, D={d}), "
                             f"got {tuple(negatives.shape)}")
    for name, value in (("in_batch_negatives", in_batch_negatives), ("exclude_self", exclude_self),
                        ("symmetric", symmetric), ("normalize", normalize)):
        check.check_flag(name, value)
    check.check_choice("reduction", reduction, check.REDUCTIONS)
    check.check_targets(targets, n, m, query.device)
    if targets is None and m != n:
        raise ValueError(f"key must have N = {n} rows (key i is the positive of query i) when "
                         f"targets is None, got M = {m}; pass targets for M != N")
    if exclude_self:
        if m != n:
            raise ValueError(f"exclude_self=True needs query and key to be the same set (M == N), "
                             f"got N = {n}, M = {m}")
        if targets is None:
            raise ValueError("exclude_self=True needs targets: without them the positive of "
                             "query i is key i, which exclude_self removes")
        if check.reads_values(targets) and bool(
                (targets == torch.arange(n, device=targets.device)).any()):
            raise ValueError("exclude_self=True: targets[i] must differ from i (the positive "
                             "would be excluded)")
    if symmetric:
        if targets is not None or m != n:
            raise ValueError(f"symmetric=True needs N == M and targets=None, got N = {n}, M = {m}, "
                             f"targets {'given' if targets is not None else 'None'}")
        if negatives is not None or not in_batch_negatives or exclude_self:
            raise ValueError("symmetric=True supports neither negatives, in_batch_negatives=False "
                             "nor exclude_self=True")


def _validate_objective(objective, has_ids):
    symmetric = objective.symmetric
    in_batch_negatives = objective.in_batch_negatives
    check.check_flag("decoupled", objective.decoupled)
    if objective.dclw_sigma is not None:
        check.positive_scalar("dclw_sigma", objective.dclw_sigma, "cpu")
        if not objective.decoupled:
            raise ValueError("dclw_sigma weights the positive of the decoupled loss (DCLW): "
                             "pass decoupled=True with it")
        if objective.hard_negatives:
            raise ValueError("dclw_sigma and hcl_beta / hcl_tau_plus cannot be combined")
    check.non_negative_float("hcl_beta", objective.hcl_beta)
    check.non_negative_float("hcl_tau_plus", objective.hcl_tau_plus)
    if objective.hcl_tau_plus >= 1:
        raise ValueError(f"hcl_tau_plus must be in [0, 1), got {objective.hcl_tau_plus}")
    if symmetric and (objective.decoupled or objective.needs_host_terms):
        raise ValueError("symmetric=True supports neither decoupled, dclw_sigma nor hcl options")
    if has_ids and objective.decoupled and in_batch_negatives:
        raise ValueError("query_ids / negative_ids cannot be combined with decoupled=True and "
                         "in_batch_negatives=True")


def _validate_ids(query_ids, negative_ids, n, negatives, device):
    if query_ids is None and negative_ids is None:
        return
    if query_ids is None or negative_ids is None:
        raise ValueError("query_ids and negative_ids must be given together, got "
                         f"query_ids={'None' if query_ids is None else 'tensor'}, "
                         f"negative_ids={'None' if negative_ids is None else 'tensor'}")
    if negatives is None or negatives.dim() != 2:
        raise ValueError("query_ids / negative_ids need shared negatives (K, D), got negatives "
                         f"{'None' if negatives is None else tuple(negatives.shape)}")
    check.check_ids("query_ids", query_ids, n, device)
    check.check_ids("negative_ids", negative_ids, negatives.shape[0], device)


@_autocast_policy
def info_nce(query, key, negatives=None, *, temperature=0.07, normalize=True, targets=None,
             in_batch_negatives=True, exclude_self=False, symmetric=False, reduction="mean",
             decoupled=False, dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, query_ids=None,
             negative_ids=None, backend="auto"):
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
    """
    return _checked_info_nce(
        query, key, negatives, temperature=temperature, normalize=normalize, targets=targets,
        in_batch_negatives=in_batch_negatives, exclude_self=exclude_self, symmetric=symmetric,
        reduction=reduction, decoupled=decoupled, dclw_sigma=dclw_sigma, hcl_beta=hcl_beta,
        hcl_tau_plus=hcl_tau_plus, query_ids=query_ids, negative_ids=negative_ids,
        backend=backend)


def _checked_info_nce(query, key, negatives, *, temperature, normalize, targets,
                      in_batch_negatives, exclude_self, symmetric, reduction, decoupled,
                      dclw_sigma, hcl_beta, hcl_tau_plus, query_ids, negative_ids, backend,
                      involutive_targets=False):
    """info_nce after validation; ``involutive_targets``: the caller guarantees
    targets[targets[i]] == i (NT-Xent), so a positive mask is symmetric (InfoNCEOptions)."""
    _validate_info_nce(query, key, negatives, targets, in_batch_negatives, exclude_self,
                       symmetric, normalize, reduction)
    _validate_ids(query_ids, negative_ids, query.shape[0], negatives, query.device)
    tau = check.positive_scalar("temperature", temperature, query.device, dtype=query.dtype)
    name = resolve(backend, query.device, dtype=query.dtype)
    options = InfoNCEOptions(name, in_batch_negatives=in_batch_negatives,
                             exclude_self=exclude_self, symmetric=symmetric, normalize=normalize,
                             reduction=reduction, decoupled=decoupled, dclw_sigma=dclw_sigma,
                             hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                             involutive_targets=involutive_targets)
    _validate_objective(options, query_ids is not None)
    return _info_nce(options, query, key, negatives, tau, tau.reciprocal(), targets, query_ids,
                     negative_ids)


def _info_nce(options, query, key, negatives, temperature, scale, targets, query_ids=None,
              negative_ids=None):
    """The validated call: the oracle (at ``temperature``), or the fused op module (at
    ``scale`` = 1 / temperature)."""
    if options.backend == "reference":
        return info_nce_reference(
            query, key, negatives, temperature=temperature, normalize=options.normalize,
            targets=targets, in_batch_negatives=options.in_batch_negatives,
            exclude_self=options.exclude_self, symmetric=options.symmetric,
            reduction=options.reduction, decoupled=options.decoupled, query_ids=query_ids,
            negative_ids=negative_ids, dclw_sigma=options.dclw_sigma, hcl_beta=options.hcl_beta,
            hcl_tau_plus=options.hcl_tau_plus)
    bank = negatives if negatives is not None and negatives.dim() == 2 else None
    per_query = negatives if negatives is not None and negatives.dim() == 3 else None
    return info_nce_loss(options, query, key, bank, per_query, scale, targets, query_ids,
                         negative_ids)


@_autocast_policy
def nt_xent(z1, z2, *, temperature=0.5, normalize=True, reduction="mean", decoupled=False,
            dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, backend="auto"):
    """SimCLR's NT-Xent over the 2N views z = [z1; z2] (lightly's NTXentLoss):
    loss_i = logsumexp_{j != i} <z_i, z_j>/tau - <z_i, z_{i+-N}>/tau, mean over the 2N rows
    ("none": (2N,), rows of z1 first). DCL / DCLW / HCL options as in info_nce."""
    check.check_view_pair(z1, z2)
    n = z1.shape[0]
    views = torch.cat([z1, z2])
    targets = (torch.arange(2 * n, device=z1.device) + n) % (2 * n)
    return _checked_info_nce(views, views, None, temperature=temperature, normalize=normalize,
                             targets=targets, in_batch_negatives=True, exclude_self=True,
                             symmetric=False, reduction=reduction, decoupled=decoupled,
                             dclw_sigma=dclw_sigma, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                             query_ids=None, negative_ids=None, backend=backend,
                             involutive_targets=True)


@_autocast_policy
def supcon(features, labels=None, *, temperature=0.1, normalize=True, reduction="mean",
           backend="auto"):
    """Supervised contrastive loss L_out (Khosla et al. 2020), fused.

    features (N, D) with labels (N,) int64, or (N, V, D) multi-view features (labels (N,) or None:
    then each sample is its own class, i.e. SimCLR over V views). For anchor a with label c:
        loss_a = logsumexp_{b != a} s_ab - mean_{p != a, label_p = c} s_ap,  s = <z^_a, z^_b> / tau
    Anchors without a positive give 0 and are left out of the mean. "none": (N,) or (N, V).
    Positives are summed per class (no N x N mask); the denominator is the fused log-sum-exp."""
    tau = check.check_supcon_args(features, labels, temperature, reduction, normalize)
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


@_autocast_policy
def moco_loss(query, key, queue, *, temperature=0.07, normalize=True, reduction="mean",
              query_index=None, decoupled=False, hcl_beta=0.0, hcl_tau_plus=0.0,
              backend="auto"):
    """MoCo's InfoNCE:
        loss_i = -log(e^{<q_i, k_i>/tau} / (e^{<q_i, k_i>/tau} + sum_j e^{<q_i, u_j>/tau}))
    with the queue entries u_j (K, D) as the only negatives (info_nce with
    in_batch_negatives=False). ``queue``: a (K, D) tensor or a NegativeQueue (its filled part).
    ``query_index`` (N,) int64: sample ids of the batch; queue entries stored with the same id
    (a NegativeQueue with store_indices=True) are not negatives. DCL / HCL options as in
    info_nce."""
    negative_ids = None
    if hasattr(queue, "negatives") and callable(queue.negatives):
        negative_ids = queue.stored_indices() if query_index is not None else None
        queue = queue.negatives()
    elif query_index is not None:
        raise ValueError("query_index needs a NegativeQueue that stores indices "
                         "(store_indices=True), got a plain tensor queue")
    # Checked here under the caller's names (info_nce calls them negatives / query_ids).
    check.check_tensor("query", query, (2,))
    check.check_tensor("queue", queue, (2,))
    check.check_same("queue", queue, "query", query)
    check.check_feature_dim("queue", queue, query.shape[1])
    if query_index is not None:
        check.check_ids("query_index", query_index, query.shape[0], query.device)
    # Not info_nce itself: its output cast would round the loss under this call's autocast.
    return _checked_info_nce(query, key, queue, temperature=temperature, normalize=normalize,
                             targets=None, in_batch_negatives=False, exclude_self=False,
                             symmetric=False, reduction=reduction, decoupled=decoupled,
                             dclw_sigma=None, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                             query_ids=query_index, negative_ids=negative_ids, backend=backend)


@_autocast_policy
def clip_loss(image, text, logit_scale, *, logit_bias=None, reduction="mean", backend="auto"):
    """OpenCLIP's ClipLoss: (CE(image -> text) + CE(text -> image)) / 2 on
    logit_scale * image @ text.T, pair i the positive. Features are used as given (CLIP models
    normalise them). ``logit_bias`` shifts every logit of a softmax equally, so it cancels: it is
    accepted for API compatibility and receives a zero gradient."""
    check.check_image_text(image, text)
    check.check_choice("reduction", reduction, check.REDUCTIONS)
    scale = check.positive_scalar("logit_scale", logit_scale, image.device, dtype=image.dtype)
    if logit_bias is not None and not isinstance(logit_bias, (torch.Tensor, float, int)):
        raise TypeError(f"logit_bias must be a float or a tensor, got {type(logit_bias).__name__}")
    name = resolve(backend, image.device, dtype=image.dtype)
    options = InfoNCEOptions(name, normalize=False, symmetric=True, reduction=reduction)
    loss = _info_nce(options, image, text, None, scale.reciprocal(), scale, None)
    if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
        # Keep logit_bias in the graph (zero gradient) without promoting the loss's dtype.
        loss = loss + (0.0 * logit_bias.sum()).to(loss.dtype)
    return loss


@_autocast_policy
def siglip_loss(image, text, logit_scale, logit_bias, *, reduction="mean", backend="auto"):
    """SigLIP's pairwise sigmoid loss, fused (never materialises the N x N logits).

    loss_i = -sum_j log sigmoid(y_ij z_ij),  z_ij = logit_scale <image_i, text_j> + logit_bias,
    y_ij = +1 if i == j else -1. image, text: (N, D), same dtype and device, used as given (no
    normalisation). logit_scale, logit_bias: finite floats or 0-dim tensors (exact gradients when
    they require grad). reduction: "mean" (total / N, as OpenCLIP), "sum", or "none" ((N,)).
    backend: "auto", "reference", "torch", "cpu", "triton" (float16 / bfloat16 / float32 only).
    """
    check.check_image_text(image, text)
    check.check_choice("reduction", reduction, check.REDUCTIONS)
    scale = check.finite_scalar("logit_scale", logit_scale, image.device, dtype=image.dtype)
    bias = check.finite_scalar("logit_bias", logit_bias, image.device, dtype=image.dtype)
    name = resolve(backend, image.device, dtype=image.dtype)
    if name == "reference":
        return siglip_loss_reference(image, text, scale, bias, reduction=reduction)
    return siglip_fused_loss(image, text, scale, bias, reduction=reduction, backend=name)
