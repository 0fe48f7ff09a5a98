"""The public distributed losses: per loss, the local argument checks (those of
fastcontrast._loss_args, shared with the single-process losses), the metadata its ranks must
agree on, and the loss over the group. What every call shares (the refusal that keeps the ranks
in step, the metadata exchange, normalisation, the reduction by the group convention) is in
calls.py; InfoNCE over the keys of all ranks (info_nce, clip_loss, nt_xent) in global_infonce.py;
the heavy part is ops.DistributedLSE / DistributedSigLIP.

Reduction convention (N_total = the rows of all ranks; W = the group size):
    "mean"  rank r returns (W / N_total) sum_{i in r} loss_i  (SupCon: W / A_total over the
            anchors that have a positive; DCL / HCL with id masks: over the rows of all ranks
            that kept a negative), so that mean_r(returned) = the single-process mean
    "sum"   rank r returns W sum_{i in r} loss_i, so that mean_r(returned) = the total
    "none"  rank r returns its rows' losses (concatenated in rank order they are the
            single-process rows, except nt_xent: each rank's [z1_r; z2_r])
"""
from dataclasses import replace

import torch

from .. import _loss_args as args
from .. import _validation as check
from .. import functional
from .._host import REDUCTIONS
from .._false_negative_args import clip_filter, info_nce_filter, moco_filter
from .._loss_args import output_dtype_policy
from ..backends import resolve
from .calls import (MODES, compute_dtype, exchange, float_code, group_reduce, mode_code, prepare,
                    refusal, start_call)
from .collectives import AllReduceWithGrad, Comm, all_gather_rows, dtype_code
from ..infonce import InfoNCEOptions
from ..infonce.matryoshka import matryoshka_args
from .false_negatives import check_margins, filter_code
from .filtered import filtered_info_nce
from .global_infonce import global_info_nce
from .matryoshka import check_matryoshka, distributed_matryoshka
from .objectives import negative_counts
from .ops import DistributedLSE, DistributedSigLIP, Layout, LSESpec

__all__ = ["info_nce", "clip_loss", "nt_xent", "supcon", "siglip_loss", "moco_loss",
           "enqueue_all", "MODES"]


@output_dtype_policy
def info_nce(query, key, negatives=None, *, temperature=0.07, normalize=True, targets=None,
             in_batch_negatives=True, exclude_self=False, symmetric=False, reduction="mean",
             decoupled=False, dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, query_ids=None,
             negative_ids=None, label_smoothing=0.0, query_labels=None, key_labels=None,
             matryoshka_dims=None, matryoshka_weights=None, false_negative_margin=None,
             guide=None, guide_margin=0.0, guide_margin_strategy="absolute",
             return_dropped=False, backend="auto", mode="gather", group=None):
    """InfoNCE over the keys of every rank of ``group`` (fastcontrast.info_nce on the
    concatenated batch; see fastcontrast.distributed for the convention).

    Each rank passes its own query (N_r, D) and key (M_r, D). ``targets`` (N_r,) int64 index the
    GLOBAL keys (the concatenation of every rank's keys in rank order), so a positive may live
    on another rank; without targets key i of a rank is the positive of its query i (M_r = N_r
    on every rank). ``negatives``: per-query (N_r, K, D) negatives stay with their rows; a 2-D
    bank (K_r, D) is this rank's share of a global bank (every rank's banks are candidates of
    every query). ``exclude_self``: query and key are the same set, global key i is removed from
    global row i. The objectives as single-process (formulas in .objectives): ``decoupled``
    (DCL), ``dclw_sigma`` (DCLW; the softmax of its weights runs over the rows of all ranks),
    ``hcl_beta`` / ``hcl_tau_plus`` (HCL; the negatives counted over all ranks, two ring /
    gather passes when hcl_beta > 0). ``query_ids`` (N_r,) / ``negative_ids`` (K_r,) with a 2-D
    bank: an entry of any rank's bank whose id equals the query's is not a candidate.
    ``label_smoothing`` as single-process, over the candidates of every rank.
    ``query_labels`` (N_r,) / ``key_labels`` (M_r,): multiple positives, every key of every rank
    with the query's label (multi_positive.py; "mean" over the rows of all ranks that have a
    positive). ``matryoshka_dims`` / ``matryoshka_weights`` as single-process (matryoshka.py:
    "gather" all prefixes in one fused pass, "ring" one ring pass per prefix). False-negative
    filtering (``false_negative_margin``, ``guide`` = (guide_query (N_r, G), guide_key (M_r, G)[,
    guide_negatives (K_r, G)]), ``guide_margin``, ``guide_margin_strategy``, ``return_dropped``)
    as single-process over the candidates of every rank (distributed/false_negatives.py);
    dropped: (N_r,) (symmetric (2, N_r)) counts over every rank's candidates."""
    with refusal(group, "info_nce", query):
        tau = args.info_nce_args(
            query, key, negatives, temperature=temperature, normalize=normalize,
            targets=targets, in_batch_negatives=in_batch_negatives, exclude_self=exclude_self,
            symmetric=symmetric, reduction=reduction, decoupled=decoupled,
            dclw_sigma=dclw_sigma, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
            query_ids=query_ids, negative_ids=negative_ids, label_smoothing=label_smoothing,
            query_labels=query_labels, key_labels=key_labels, global_targets=True)
        fn = info_nce_filter(
            query, key, negatives, exclude_self=exclude_self, symmetric=symmetric,
            objectives=decoupled or dclw_sigma is not None or hcl_beta != 0 or hcl_tau_plus != 0,
            label_smoothing=label_smoothing, labels=query_labels is not None,
            matryoshka=matryoshka_dims is not None, false_negative_margin=false_negative_margin,
            guide=guide, guide_margin=guide_margin, guide_margin_strategy=guide_margin_strategy,
            return_dropped=return_dropped)
        options = InfoNCEOptions(backend, in_batch_negatives=in_batch_negatives,
                                 exclude_self=exclude_self, symmetric=symmetric,
                                 normalize=normalize, reduction=reduction, decoupled=decoupled,
                                 dclw_sigma=dclw_sigma, hcl_beta=hcl_beta,
                                 hcl_tau_plus=hcl_tau_plus, label_smoothing=label_smoothing)
        dims, weights = matryoshka_args(matryoshka_dims, matryoshka_weights, query.shape[-1])
        if dims:
            check_matryoshka(options, negatives, query_ids, (query_labels, key_labels))
        comm, name = start_call("info_nce", mode, group, backend, query.device, query.dtype)
    options = replace(options, backend=name, matryoshka_dims=dims, matryoshka_weights=weights)
    if fn is not None:  # false-negative filtering (filtered.py)
        return filtered_info_nce(comm, options, mode, query, key, negatives, tau.reciprocal(),
                                 targets, query_ids, negative_ids, fn, return_dropped)
    if dims:
        return distributed_matryoshka(comm, options, mode, query, key, negatives,
                                      tau.reciprocal(), targets)
    labels = None if query_labels is None else (query_labels, key_labels)
    return global_info_nce(comm, options, mode, query, key, negatives, tau.reciprocal(), targets,
                           query_ids, negative_ids, labels=labels)


@output_dtype_policy
def clip_loss(image, text, logit_scale, *, logit_bias=None, reduction="mean", label_smoothing=0.0,
              labels=None, matryoshka_dims=None, matryoshka_weights=None,
              false_negative_margin=None, guide=None, guide_margin=0.0,
              guide_margin_strategy="absolute", return_dropped=False, backend="auto",
              mode="gather", group=None):
    """OpenCLIP's ClipLoss over the texts and images of every rank (symmetric: one pass gives
    the row and the column log-sum-exps). ``logit_scale`` is never all-reduced (DDP averages
    its gradient); ``logit_bias`` cancels and gets a zero gradient, as single-process.
    ``label_smoothing`` as single-process; ``labels`` (N_r,): multiple positives, the texts /
    images of every rank with the label (info_nce's query_labels = key_labels = labels);
    ``matryoshka_dims`` / ``matryoshka_weights`` as single-process ("gather": one fused pass,
    "ring": one pass per prefix). False-negative filtering as single-process over the texts /
    images of every rank, guide = (guide_image (N_r, G), guide_text (N_r, G)); return_dropped:
    (loss, dropped (2, N_r))."""
    with refusal(group, "clip_loss", image):
        scale = args.clip_loss_args(image, text, logit_scale, logit_bias, reduction,
                                    label_smoothing, labels)
        fn = clip_filter(image, text, label_smoothing=label_smoothing, labels=labels is not None,
                         matryoshka=matryoshka_dims is not None,
                         false_negative_margin=false_negative_margin, guide=guide,
                         guide_margin=guide_margin, guide_margin_strategy=guide_margin_strategy,
                         return_dropped=return_dropped)
        options = InfoNCEOptions(backend, normalize=False, symmetric=True, reduction=reduction,
                                 label_smoothing=label_smoothing)
        dims, weights = matryoshka_args(matryoshka_dims, matryoshka_weights, image.shape[-1])
        if dims:
            check_matryoshka(options, labels=(labels, labels))
        comm, name = start_call("clip_loss", mode, group, backend, image.device, image.dtype)
    options = replace(options, backend=name, matryoshka_dims=dims, matryoshka_weights=weights)
    if fn is not None:  # false-negative filtering (filtered.py)
        out = filtered_info_nce(comm, options, mode, image, text, None, scale, None, None, None,
                                fn, return_dropped, names=("image", "text"))
    elif dims:
        out = distributed_matryoshka(comm, options, mode, image, text, None, scale, None,
                                     q_name="image")
    else:
        out = global_info_nce(comm, options, mode, image, text, None, scale, None,
                              q_name="image", labels=None if labels is None else (labels, labels))
    loss, dropped = out if return_dropped else (out, None)
    if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
        loss = loss + (0.0 * logit_bias.sum()).to(loss.dtype)
    return (loss, dropped) if return_dropped else loss


@output_dtype_policy
def nt_xent(z1, z2, *, temperature=0.5, normalize=True, reduction="mean", decoupled=False,
            dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, label_smoothing=0.0,
            matryoshka_dims=None, matryoshka_weights=None, backend="auto", mode="gather",
            group=None):
    """SimCLR's NT-Xent over the 2 N_total views of every rank: the positive of view z1_i is
    z2_i (same rank), the negatives every other view of every rank, self excluded (info_nce on
    each rank's views [z1_r; z2_r], targets into the global views). Per-rank batch sizes may
    differ. "none": (2 N_r,), this rank's [z1; z2] rows. DCL / DCLW / HCL options as in
    info_nce. ``matryoshka_dims`` / ``matryoshka_weights`` as in info_nce (each prefix of the
    views normalised on its own)."""
    with refusal(group, "nt_xent", z1):
        tau = args.nt_xent_args(z1, z2, temperature=temperature, normalize=normalize,
                                reduction=reduction, decoupled=decoupled, dclw_sigma=dclw_sigma,
                                hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                                label_smoothing=label_smoothing)
        options = InfoNCEOptions(backend, exclude_self=True, normalize=normalize,
                                 reduction=reduction, decoupled=decoupled, dclw_sigma=dclw_sigma,
                                 hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                                 label_smoothing=label_smoothing)
        dims, weights = matryoshka_args(matryoshka_dims, matryoshka_weights, z1.shape[-1])
        if dims:
            check_matryoshka(options)
        comm, name = start_call("nt_xent", mode, group, backend, z1.device, z1.dtype)
    options = replace(options, backend=name, matryoshka_dims=dims, matryoshka_weights=weights)
    table = exchange(comm, z1.device, [
        (None, z1.shape[0]), ("the feature dimension D of z1", z1.shape[1]),
        ("dtype of z1", dtype_code(z1.dtype))])
    n = z1.shape[0]
    offset = sum(2 * r[0] for r in table[:comm.rank])
    local = torch.arange(2 * n, device=z1.device)
    views = torch.cat([z1, z2])
    targets = offset + (local + n) % (2 * n)

    if dims:
        return distributed_matryoshka(comm, options, mode, views, views, None, tau.reciprocal(),
                                      targets, targets_valid=True)
    return global_info_nce(comm, options, mode, views, views, None, tau.reciprocal(), targets,
                           targets_valid=True)


def _dense_classes(labels):
    """Dense class ids in [0, C) of int64 labels (sorted unique), and C."""
    unique, inverse = torch.unique(labels, return_inverse=True)
    return inverse, unique.shape[0]


@output_dtype_policy
def supcon(features, labels=None, *, temperature=0.1, normalize=True, reduction="mean",
           backend="auto", mode="gather", group=None):
    """SupCon L_out over the samples of every rank: the labels travel with the features (one
    all_gather of the labels, O(N_total) int64), the positives of an anchor are all samples of
    every rank with its label, the denominator runs over every other sample (self excluded at
    its global position). The positive term uses the class sums of the normalised features,
    all-reduced with autograd ((C, D) floats, C the number of distinct labels). Anchors without
    a positive give 0 and are left out of the mean, counted over all ranks. (N, V, D) features:
    labels default to the global sample index."""
    with refusal(group, "supcon", features):
        tau = args.supcon_args(features, labels, temperature, reduction, normalize)
        n = features.shape[0]
        comm, name = start_call("supcon", mode, group, backend, features.device, features.dtype)
    table = exchange(comm, features.device, [
        (None, n), ("the number of dimensions of features", features.dim()),
        ("the shape[1:] of features", features.shape[1]),
        ("the feature dimension D of features", features.shape[-1]),
        ("dtype of features", dtype_code(features.dtype)), ("labels given", labels is not None),
        ("mode", mode_code(mode)), ("normalize", int(normalize)),
        ("reduction", REDUCTIONS.index(reduction))])
    shape = features.shape[:-1]
    if features.dim() == 3:
        views = features.shape[1]
        if labels is None:
            start = sum(r[0] for r in table[:comm.rank])
            labels = torch.arange(start, start + n, device=features.device)
        labels = labels.repeat_interleave(views)
        features = features.reshape(-1, features.shape[-1])
    sizes = [r[0] * (features.shape[0] // max(n, 1)) for r in table]
    z = prepare(features, compute_dtype(name, features.dtype), normalize)
    acc = torch.float64 if z.dtype == torch.float64 else torch.float32
    all_labels = all_gather_rows(comm, labels.contiguous(), sizes)
    cls_all, n_classes = _dense_classes(all_labels)
    offset = sum(sizes[:comm.rank])
    cls = cls_all[offset:offset + z.shape[0]]
    counts = torch.bincount(cls_all, minlength=n_classes)
    pos_count = counts[cls] - 1
    anchors = int((counts[cls_all] > 1).sum())
    zf = z.to(acc)
    local_sums = torch.zeros(n_classes, zf.shape[1], dtype=acc, device=z.device).index_add(
        0, cls, zf)
    class_sums = AllReduceWithGrad.apply(local_sums, comm)
    scale = tau.reciprocal()
    pos_mean = ((zf * class_sums[cls]).sum(1) - (zf * zf).sum(1)) * scale.to(acc) \
        / pos_count.clamp_min(1)
    spec = LSESpec(mode, name, exclude_self=True, with_col=False)
    row_lse, _, _ = DistributedLSE.apply(z, scale, z, None, None, None, comm,
                                         Layout(tuple(sizes), tuple(sizes)), spec)
    has_positive = pos_count > 0
    loss = torch.where(has_positive, row_lse.to(acc) - pos_mean, torch.zeros_like(pos_mean))
    if reduction == "none":
        return loss.reshape(shape)
    return group_reduce(comm, loss, reduction, anchors)


@output_dtype_policy
def siglip_loss(image, text, logit_scale, logit_bias, *, reduction="mean", backend="auto",
                mode="gather", group=None):
    """SigLIP's sigmoid loss of this rank's images against the texts of every rank (the
    positive of image i is its own text i). ``logit_scale`` / ``logit_bias`` are never
    all-reduced (DDP averages their gradients). "mean" divides by N_total (OpenCLIP)."""
    with refusal(group, "siglip_loss", image):
        scale, bias = args.siglip_loss_args(image, text, logit_scale, logit_bias, reduction)
        comm, name = start_call("siglip_loss", mode, group, backend, image.device, image.dtype)
    table = exchange(comm, image.device, [
        (None, image.shape[0]), ("the feature dimension D of image", image.shape[1]),
        ("dtype of image", dtype_code(image.dtype)), ("mode", mode_code(mode)),
        ("reduction", REDUCTIONS.index(reduction))])
    sizes = tuple(r[0] for r in table)
    cdt = compute_dtype(name, image.dtype)
    loss = DistributedSigLIP.apply(image.to(cdt).contiguous(), text.to(cdt).contiguous(), scale,
                                   bias, comm, Layout(sizes, sizes), mode, name)
    return group_reduce(comm, loss, reduction, sum(sizes))


@output_dtype_policy
def moco_loss(query, key, queue, *, temperature=0.07, normalize=True, reduction="mean",
              query_index=None, decoupled=False, hcl_beta=0.0, hcl_tau_plus=0.0,
              label_smoothing=0.0, false_negative_margin=None, guide=None, guide_margin=0.0,
              guide_margin_strategy="absolute", return_dropped=False, backend="auto",
              mode="gather", group=None):
    """MoCo's loss: the positive is the rank's own key, the negatives the queue, which every
    rank holds identically (keep it so with enqueue_all), so nothing but the batch sizes is
    communicated (``mode`` is accepted for symmetry). The returned loss follows the group
    convention; DCL / HCL options and ``query_index`` as single-process (with query_index and
    DCL / HCL, "mean" is over the rows of all ranks that kept a negative). False-negative
    filtering of the queue as single-process (guide_queue: the shared queue's guide rows);
    return_dropped: (loss, dropped (N_r,))."""
    with refusal(group, "moco_loss", query):
        check.check_choice("mode", mode, MODES)
        bank, bank_ids = args.unwrap_queue(queue, query_index)
        args.moco_loss_args(query, key, bank, bank_ids, temperature=temperature,
                            normalize=normalize, reduction=reduction, query_index=query_index,
                            decoupled=decoupled, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                            label_smoothing=label_smoothing)
        fn = moco_filter(query, key, bank,
                         objectives=decoupled or hcl_beta != 0 or hcl_tau_plus != 0,
                         label_smoothing=label_smoothing,
                         false_negative_margin=false_negative_margin, guide=guide,
                         guide_margin=guide_margin, guide_margin_strategy=guide_margin_strategy,
                         return_dropped=return_dropped)
        resolve(backend, query.device, dtype=query.dtype)
        comm = Comm(group, caller="fastcontrast.distributed.moco_loss")
    exchange(comm, query.device, [
        (None, query.shape[0]), ("the feature dimension D of query", query.shape[1]),
        ("dtype of query", dtype_code(query.dtype)),
        ("reduction", REDUCTIONS.index(reduction)), ("decoupled", int(decoupled)),
        ("hcl_beta", float_code(hcl_beta)), ("hcl_tau_plus", float_code(hcl_tau_plus)),
        ("label_smoothing", float_code(label_smoothing)), *filter_code(fn, return_dropped)])
    if fn is not None:
        check_margins(comm, query.device, fn)
    # Unwrapped: the output dtype is decided once, by this function's own wrapper. It checks
    # the arguments again; an error it raises after the exchange above (none is expected once
    # they passed here) must still reach the other ranks.
    try:
        loss = functional.moco_loss.__wrapped__(query, key, queue, temperature=temperature,
                                                normalize=normalize,
                                                reduction="sum" if reduction == "mean"
                                                else reduction,
                                                query_index=query_index, decoupled=decoupled,
                                                hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
                                                label_smoothing=label_smoothing,
                                                false_negative_margin=false_negative_margin,
                                                guide=guide, guide_margin=guide_margin,
                                                guide_margin_strategy=guide_margin_strategy,
                                                return_dropped=return_dropped, backend=backend)
    except (TypeError, ValueError):
        if reduction != "none":  # the others wait in the exchange of the counts below
            comm.exchange([0], query.device, failed=True)
        raise
    loss, dropped = loss if return_dropped else (loss, None)
    if reduction == "none":
        return (loss, dropped) if return_dropped else loss
    counted = query.shape[0]
    if query_index is not None and (decoupled or hcl_beta or hcl_tau_plus):
        counts = negative_counts(bank_ids.shape[0], query.shape[0], query_index, bank_ids,
                                 query.device, torch.float64)
        counted = int((counts > 0).sum())
    total = sum(r[0] for r in comm.exchange([counted], query.device))
    scaled = loss * comm.world
    scaled = scaled / max(total, 1) if reduction == "mean" else scaled
    return (scaled, dropped) if return_dropped else scaled


@torch.no_grad()
def enqueue_all(queue, keys, labels=None, indices=None, *, group=None):
    """Enqueue the keys (and labels / indices) of every rank of ``group`` into ``queue`` (a
    NegativeQueue), in rank order, on every rank: the queues of all ranks stay identical.
    Batch sizes may differ per rank. One all_gather per tensor."""
    with refusal(group, "enqueue_all", keys):
        comm = Comm(group, caller="fastcontrast.distributed.enqueue_all")
        check.check_tensor("keys", keys, (2,))
    table = exchange(comm, keys.device, [
        (None, keys.shape[0]), ("the feature dimension D of keys", keys.shape[1]),
        ("dtype of keys", dtype_code(keys.dtype)), ("labels given", labels is not None),
        ("indices given", indices is not None)])
    sizes = [r[0] for r in table]
    gathered = [None if t is None else all_gather_rows(comm, t.detach().contiguous(), sizes)
                for t in (keys, labels, indices)]
    queue.enqueue(gathered[0], labels=gathered[1], indices=gathered[2])
