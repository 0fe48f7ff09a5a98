"""What the single-process losses (fastcontrast.functional) and their distributed twins
(fastcontrast.distributed) share about a call: one argument check per loss, so that the same
bad input raises the same error in both layers, and the output dtype policy.

Each ``<loss>_args`` function checks every local argument of that loss (shapes, dtypes,
devices, options, reduction, temperature / scales, ids, objective flags) and returns the
scalars converted as _validation.finite_scalar does. What depends on the other ranks (agreement
across ranks, targets against the keys of all ranks, mode, group) is checked by the
distributed layer. Checks that would read tensor values are skipped where
_validation.reads_values says so (torch.compile, meta tensors).
"""
import functools

import torch

from . import _validation as check
from ._host import REDUCTIONS

__all__ = ["output_dtype_policy", "label_smoothing_arg", "labels_args", "info_nce_args",
           "clip_loss_args", "nt_xent_args", "supcon_args", "moco_loss_args", "siglip_loss_args",
           "unwrap_queue", "distill_args", "distill_clip_args"]

_FLAGS = ("in_batch_negatives", "exclude_self", "symmetric", "normalize")


def output_dtype_policy(loss_fn):
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
            return _on_loss(loss_fn(*args, **kwargs), lambda loss: loss.to(first.dtype))
        with torch.autocast(device, enabled=False):
            out = loss_fn(*args, **kwargs)
        return _on_loss(out, lambda loss: loss if loss.dtype == torch.float64 else loss.float())

    return wrapper


def _on_loss(out, cast):
    """``cast`` applied to the loss, or to the first item of (loss, *extras) (return_dropped)."""
    return (cast(out[0]), *out[1:]) if isinstance(out, tuple) else cast(out)


def _objective_args(*, decoupled, dclw_sigma, hcl_beta, hcl_tau_plus, symmetric,
                    in_batch_negatives, has_ids):
    """DCL (decoupled), DCLW (dclw_sigma > 0, needs decoupled, not with HCL), HCL (hcl_beta >= 0,
    hcl_tau_plus in [0, 1)); none of them with symmetric; ids not with DCL over in-batch
    keys."""
    check.check_flag("decoupled", decoupled)
    hard_negatives = hcl_beta != 0 or hcl_tau_plus != 0
    if dclw_sigma is not None:
        check.positive_scalar("dclw_sigma", dclw_sigma, "cpu")
        if not decoupled:
            raise ValueError("dclw_sigma weights the positive of the decoupled loss (DCLW): "
                             "pass decoupled=True with it")
        if hard_negatives:
            raise ValueError("dclw_sigma and hcl_beta / hcl_tau_plus cannot be combined")
    check.non_negative_float("hcl_beta", hcl_beta)
    check.non_negative_float("hcl_tau_plus", hcl_tau_plus)
    if hcl_tau_plus >= 1:
        raise ValueError(f"hcl_tau_plus must be in [0, 1), got {hcl_tau_plus}")
    if symmetric and (decoupled or dclw_sigma is not None or hard_negatives):
        raise ValueError("symmetric=True supports neither decoupled, dclw_sigma nor hcl options")
    if has_ids and decoupled and in_batch_negatives:
        raise ValueError("query_ids / negative_ids cannot be combined with decoupled=True and "
                         "in_batch_negatives=True")


def label_smoothing_arg(label_smoothing, *, decoupled=False, dclw_sigma=None, hcl_beta=0.0,
                        hcl_tau_plus=0.0):
    """label_smoothing: a float in [0, 1] (as F.cross_entropy's), and the positive must be a
    candidate: not with DCL / DCLW / HCL."""
    check.non_negative_float("label_smoothing", label_smoothing)
    if label_smoothing > 1:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if label_smoothing and (decoupled or dclw_sigma is not None or hcl_beta != 0
                            or hcl_tau_plus != 0):
        raise ValueError("label_smoothing needs the positive among the candidates: it cannot be "
                         "combined with decoupled, dclw_sigma or hcl_beta / hcl_tau_plus")


def _both_or_neither(name_a, a, name_b, b):
    """True when both are given, False when neither; ValueError naming them otherwise."""
    if a is None and b is None:
        return False
    if a is None or b is None:
        raise ValueError(f"{name_a} and {name_b} must be given together, got "
                         f"{name_a}={'None' if a is None else 'tensor'}, "
                         f"{name_b}={'None' if b is None else 'tensor'}")
    return True


def labels_args(query_labels, key_labels, n, m, device, *, targets, in_batch_negatives,
                objective, label_smoothing):
    """query_labels (N,) and key_labels (M,) int64, both or neither: the positives of query i
    are the keys with its label, so not with targets, without in-batch keys, with DCL / DCLW /
    HCL (``objective``) or label smoothing."""
    if not _both_or_neither("query_labels", query_labels, "key_labels", key_labels):
        return
    check.check_ids("query_labels", query_labels, n, device)
    check.check_ids("key_labels", key_labels, m, device)
    if targets is not None:
        raise ValueError("query_labels / key_labels choose the positives: targets must be None")
    if not in_batch_negatives:
        raise ValueError("query_labels / key_labels need in_batch_negatives=True (the positives "
                         "are keys)")
    if objective or label_smoothing:
        raise ValueError("query_labels / key_labels cannot be combined with decoupled, "
                         "dclw_sigma, hcl_beta / hcl_tau_plus or label_smoothing")


def _ids_args(query_ids, negative_ids, n, negatives, device):
    """query_ids (N,) and negative_ids (K,) int64, both or neither, with a shared bank (K, D)."""
    if not _both_or_neither("query_ids", query_ids, "negative_ids", negative_ids):
        return
    if negatives is None or negatives.dim() != 2:
        raise ValueError("query_ids / negative_ids need shared negatives (K, D), got negatives "
                         f"{'None' if negatives is None else tuple(negatives.shape)}")
    check.check_ids("query_ids", query_ids, n, device)
    check.check_ids("negative_ids", negative_ids, negatives.shape[0], device)


def info_nce_args(query, key, negatives, *, temperature, normalize, targets, in_batch_negatives,
                  exclude_self, symmetric, reduction, decoupled, dclw_sigma, hcl_beta,
                  hcl_tau_plus, query_ids, negative_ids, label_smoothing=0.0,
                  query_labels=None, key_labels=None, global_targets=False):
    """info_nce's arguments; returns the temperature (positive_scalar, accumulation dtype).

    query (N, D), key (M, D) and negatives (K, D) or (N, K, D): floating, one dtype and device,
    one D. targets (N,) int64; without them key i is the positive of query i (M == N).
    exclude_self: M == N, targets given, targets[i] != i. symmetric: M == N, no targets, no
    negatives, in-batch negatives, no exclude_self. ``global_targets``: the targets index the
    keys of every rank (fastcontrast.distributed), so their values (range, != own row) are
    checked by the caller against the global layout, not against this key."""
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
    for name, value in zip(_FLAGS, (in_batch_negatives, exclude_self, symmetric, normalize)):
        check.check_flag(name, value)
    check.check_choice("reduction", reduction, REDUCTIONS)
    check.check_targets(targets, n, None if global_targets else m, query.device)
    has_labels = query_labels is not None or key_labels is not None
    if targets is None and m != n and not has_labels:
        raise ValueError(f"key must have N = {n} rows (key i is the positive of query i) when "
                         f"targets is None, got M = {m}; pass targets for M != N")
    if exclude_self:
        if m != n:
            raise ValueError(f"exclude_self=True needs query and key to be the same set (M == N), "
                             f"got N = {n}, M = {m}")
        if targets is None and not has_labels:
            raise ValueError("exclude_self=True needs targets: without them the positive of "
                             "query i is key i, which exclude_self removes")
        if targets is not None and not global_targets:
            check.check_targets_not_self(targets)
    if symmetric:
        if targets is not None or m != n:
            raise ValueError(f"symmetric=True needs N == M and targets=None, got N = {n}, M = {m}, "
                             f"targets {'given' if targets is not None else 'None'}")
        if negatives is not None or not in_batch_negatives or exclude_self:
            raise ValueError("symmetric=True supports neither negatives, in_batch_negatives=False "
                             "nor exclude_self=True")
    _ids_args(query_ids, negative_ids, n, negatives, query.device)
    tau = check.positive_scalar("temperature", temperature, query.device, dtype=query.dtype)
    _objective_args(decoupled=decoupled, dclw_sigma=dclw_sigma, hcl_beta=hcl_beta,
                    hcl_tau_plus=hcl_tau_plus, symmetric=symmetric,
                    in_batch_negatives=in_batch_negatives, has_ids=query_ids is not None)
    label_smoothing_arg(label_smoothing, decoupled=decoupled, dclw_sigma=dclw_sigma,
                        hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus)
    labels_args(query_labels, key_labels, n, m, query.device, targets=targets,
                in_batch_negatives=in_batch_negatives,
                objective=decoupled or dclw_sigma is not None or hcl_beta != 0
                or hcl_tau_plus != 0, label_smoothing=label_smoothing)
    return tau


def clip_loss_args(image, text, logit_scale, logit_bias, reduction, label_smoothing=0.0,
                   labels=None):
    """clip_loss's arguments: image and text (N, D) of one shape, dtype and device, logit_scale
    positive and finite, logit_bias None, a number or a tensor (it cancels). Returns
    logit_scale (positive_scalar, accumulation dtype)."""
    check.check_image_text(image, text)
    check.check_choice("reduction", reduction, REDUCTIONS)
    scale = check.positive_scalar("logit_scale", logit_scale, image.device, dtype=image.dtype)
    if logit_bias is not None and not isinstance(logit_bias, (torch.Tensor, float, int)):
        raise TypeError(f"logit_bias must be a float or a tensor, got {type(logit_bias).__name__}")
    label_smoothing_arg(label_smoothing)
    n = image.shape[0]
    labels_args(labels, None if labels is None else labels, n, n, image.device, targets=None,
                in_batch_negatives=True, objective=False, label_smoothing=label_smoothing)
    return scale


def nt_xent_args(z1, z2, *, temperature, normalize, reduction, decoupled, dclw_sigma, hcl_beta,
                 hcl_tau_plus, label_smoothing=0.0):
    """nt_xent's arguments: the two views (check_view_pair), the flags, reduction, a positive
    temperature (returned, accumulation dtype) and the DCL / DCLW / HCL options (info_nce's,
    with in-batch negatives and no ids)."""
    check.check_view_pair(z1, z2)
    check.check_flag("normalize", normalize)
    check.check_choice("reduction", reduction, REDUCTIONS)
    tau = check.positive_scalar("temperature", temperature, z1.device, dtype=z1.dtype)
    _objective_args(decoupled=decoupled, dclw_sigma=dclw_sigma, hcl_beta=hcl_beta,
                    hcl_tau_plus=hcl_tau_plus, symmetric=False, in_batch_negatives=True,
                    has_ids=False)
    label_smoothing_arg(label_smoothing, decoupled=decoupled, dclw_sigma=dclw_sigma,
                        hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus)
    return tau


def supcon_args(features, labels, temperature, reduction, normalize):
    """SupCon's arguments: (N, D) features with (N,) int64 labels, or (N, V, D) with labels
    optional; returns the temperature as finite_scalar does (in the accumulation dtype)."""
    check.check_tensor("features", features, (2, 3))
    check.check_choice("reduction", reduction, REDUCTIONS)
    check.check_flag("normalize", normalize)
    if labels is None and features.dim() == 2:
        raise ValueError("supcon needs labels for (N, D) features (or (N, V, D) multi-view "
                         "features, where labels default to the sample index)")
    if labels is not None:
        check.check_ids("labels", labels, features.shape[0], features.device)
    return check.positive_scalar("temperature", temperature, features.device,
                                 dtype=features.dtype)


def unwrap_queue(queue, query_index):
    """(queue tensor, its stored ids or None) of moco_loss's ``queue``: a (K, D) tensor or a
    NegativeQueue (its filled part); query_index needs a NegativeQueue that stores ids."""
    if hasattr(queue, "negatives") and callable(queue.negatives):
        negative_ids = queue.stored_indices() if query_index is not None else None
        return queue.negatives(), negative_ids
    if query_index is not None:
        raise ValueError("query_index needs a NegativeQueue that stores indices "
                         "(store_indices=True), got a plain tensor queue")
    return queue, None


def moco_loss_args(query, key, queue, negative_ids, *, temperature, normalize, reduction,
                   query_index, decoupled, hcl_beta, hcl_tau_plus, label_smoothing=0.0):
    """moco_loss's arguments, ``queue`` and ``negative_ids`` as unwrap_queue returns them:
    info_nce's with the queue as a shared bank, no in-batch negatives and query_index as
    query_ids, the queue and query_index checked first under these names. Returns the
    temperature (positive_scalar, accumulation dtype)."""
    check.check_tensor("query", query, (2,))
    check.check_tensor("queue", queue, (2,))
    check.check_same("queue", queue, "query", query)
    check.check_feature_dim("queue", queue, query.shape[1])
    if query_index is not None:
        check.check_ids("query_index", query_index, query.shape[0], query.device)
    return info_nce_args(query, key, queue, temperature=temperature, normalize=normalize,
                         targets=None, in_batch_negatives=False, exclude_self=False,
                         symmetric=False, reduction=reduction, decoupled=decoupled,
                         dclw_sigma=None, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                         query_ids=query_index, negative_ids=negative_ids,
                         label_smoothing=label_smoothing)


def siglip_loss_args(image, text, logit_scale, logit_bias, reduction):
    """siglip_loss's arguments: image and text (N, D) of one shape, dtype and device, finite
    logit_scale and logit_bias; returns both (finite_scalar, accumulation dtype)."""
    check.check_image_text(image, text)
    check.check_choice("reduction", reduction, REDUCTIONS)
    scale = check.finite_scalar("logit_scale", logit_scale, image.device, dtype=image.dtype)
    bias = check.finite_scalar("logit_bias", logit_bias, image.device, dtype=image.dtype)
    return scale, bias


def distill_args(student_query, student_key, teacher_query, teacher_key, *, temperature,
                 teacher_temperature, symmetric, normalize, reduction):
    """distill_info_nce's arguments: student (N, D) and (M, D), teacher (N, DT) and (M, DT)
    (the teacher's feature dim its own), one floating dtype and device; symmetric needs
    N == M. Returns (temperature, teacher_temperature) (positive_scalar, accumulation dtype)."""
    check.check_tensor("student_query", student_query, (2,))
    n, d = student_query.shape
    for name, t in (("student_key", student_key), ("teacher_query", teacher_query),
                    ("teacher_key", teacher_key)):
        check.check_tensor(name, t, (2,))
        check.check_same(name, t, "student_query", student_query)
    for name, t, dim, source in (("student_key", student_key, d, "student_query"),
                                 ("teacher_key", teacher_key, teacher_query.shape[1],
                                  "teacher_query")):
        if t.shape[1] != dim:
            raise ValueError(f"{name} must have feature dimension {dim} (that of {source}), "
                             f"got shape {tuple(t.shape)}")
    m = student_key.shape[0]
    if teacher_query.shape[0] != n:
        raise ValueError(f"teacher_query must have N = {n} rows (one per student query), got "
                         f"{teacher_query.shape[0]}")
    if teacher_key.shape[0] != m:
        raise ValueError(f"teacher_key must have M = {m} rows (one per student key), got "
                         f"{teacher_key.shape[0]}")
    check.check_flag("symmetric", symmetric)
    check.check_flag("normalize", normalize)
    check.check_choice("reduction", reduction, REDUCTIONS)
    if symmetric and m != n:
        raise ValueError(f"symmetric=True needs as many keys as queries (N == M), got N = {n}, "
                         f"M = {m}")
    device, dtype = student_query.device, student_query.dtype
    return (check.positive_scalar("temperature", temperature, device, dtype=dtype),
            check.positive_scalar("teacher_temperature", teacher_temperature, device,
                                  dtype=dtype))


def distill_clip_args(student_image, student_text, teacher_image, teacher_text, logit_scale,
                      teacher_logit_scale, reduction):
    """distill_clip_loss's arguments: the student's image and text (N, D) of one shape, the
    teacher's (N, DT) of one shape (DT its own), one floating dtype and device; both logit
    scales positive and finite. Returns (logit_scale, teacher_logit_scale) (positive_scalar,
    accumulation dtype)."""
    check.check_image_text(student_image, student_text, ("student_image", "student_text"))
    check.check_tensor("teacher_image", teacher_image, (2,))
    check.check_same("teacher_image", teacher_image, "student_image", student_image)
    check.check_image_text(teacher_image, teacher_text, ("teacher_image", "teacher_text"))
    n = student_image.shape[0]
    if teacher_image.shape[0] != n:
        raise ValueError(f"teacher_image must have N = {n} rows (one per student image), got "
                         f"{teacher_image.shape[0]}")
    check.check_choice("reduction", reduction, REDUCTIONS)
    device, dtype = student_image.device, student_image.dtype
    return (check.positive_scalar("logit_scale", logit_scale, device, dtype=dtype),
            check.positive_scalar("teacher_logit_scale", teacher_logit_scale, device,
                                  dtype=dtype))
