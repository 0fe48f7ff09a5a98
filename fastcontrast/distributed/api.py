"""The public distributed losses: the checks that involve the group (mode, agreement across
ranks, targets against the keys of all ranks; the local argument checks are those of
fastcontrast._loss_args, shared with the single-process losses), the metadata exchange, the
global index of the positives, normalisation (with autograd) and the reduction by the group
convention; the heavy part is ops.DistributedLSE / DistributedSigLIP.

Reduction convention (N_total = the rows of all ranks; W = the group size):
    "mean"  rank r returns (W / N_total) sum_{i in r} loss_i  (SupCon: W / A_total over the
            anchors that have a positive; DCL / HCL with id masks: over the rows of all ranks
            that kept a negative), so that mean_r(returned) = the single-process mean
    "sum"   rank r returns W sum_{i in r} loss_i, so that mean_r(returned) = the total
    "none"  rank r returns its rows' losses (concatenated in rank order they are the
            single-process rows, except nt_xent: each rank's [z1_r; z2_r])
"""
import struct
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .. import _loss_args as args
from .. import _validation as check
from .. import functional
from .._host import REDUCTIONS
from .._loss_args import output_dtype_policy
from ..backends import PROPERTIES, resolve
from .collectives import (AllGatherWithGrad, AllReduceWithGrad, Comm, all_gather_rows,
                          dtype_code)
from ..infonce import InfoNCEOptions
from .objectives import Candidates, negative_counts, row_losses
from .ops import DistributedLSE, DistributedSigLIP, Layout, LSESpec

__all__ = ["info_nce", "clip_loss", "nt_xent", "supcon", "siglip_loss", "moco_loss",
           "enqueue_all", "MODES"]

MODES = ("gather", "ring")
_EPS = 1e-12  # as torch.nn.functional.normalize and the single-process losses


def _start(name, mode, group, backend, device, dtype):
    """(Comm, resolved backend) after the local checks that need no communication."""
    check.check_choice("mode", mode, MODES)
    comm = Comm(group, caller=f"fastcontrast.distributed.{name}")
    if backend == "reference":
        raise ValueError(f"fastcontrast.distributed.{name} runs the fused kernels: backend must "
                         "be 'auto', 'torch', 'cpu' or 'triton', got 'reference'")
    return comm, resolve(backend, device, dtype=dtype)


@contextmanager
def _refusal(group, name, tensor):
    """Local argument checks of fastcontrast.distributed.``name``: when one raises a TypeError
    or ValueError while a process group is initialised, this rank first joins the call's
    metadata exchange with a failure status (Comm.exchange), so the other ranks raise too
    instead of waiting in it; then the error propagates."""
    try:
        yield
    except (TypeError, ValueError):
        if dist.is_available() and dist.is_initialized():
            comm = Comm(group, caller=f"fastcontrast.distributed.{name}")
            comm.exchange([], _exchange_device(comm, tensor), failed=True)
        raise


def _exchange_device(comm, tensor):
    if isinstance(tensor, torch.Tensor) and (comm.backend != "nccl" or tensor.is_cuda):
        return tensor.device
    return torch.device("cuda", torch.cuda.current_device()) if comm.backend == "nccl" \
        else torch.device("cpu")


def _exchange(comm, device, rows):
    """Every rank's metadata (``rows``: (what, value) pairs, values ints); checks that every
    entry whose ``what`` is not None agrees across ranks (a clear ValueError naming it and the
    ranks' values, on every rank at once: no rank is left waiting). Returns the W x k table."""
    table = comm.exchange([int(v) for _, v in rows], device)
    for column, (what, _) in enumerate(rows):
        if what is None:
            continue
        if what.startswith("dtype of "):
            comm.check_dtype(table, column, what[len("dtype of "):])
        else:
            comm.check_same(table, column, what)
    return table


def _mode_code(mode):
    return MODES.index(mode)


def _prepare(t, dtype, normalize):
    t = t.to(dtype)
    return (F.normalize(t, dim=-1, eps=_EPS) if normalize else t).contiguous()


def _reduce(comm, loss, reduction, total):
    """The group convention (see the module docstring): this rank's share of the loss."""
    if reduction == "none":
        return loss
    scaled = loss.sum() * comm.world
    return scaled / max(total, 1) if reduction == "mean" else scaled


def _compute_dtype(backend, dtype):
    return PROPERTIES[backend].compute_dtype(dtype)


def _product(k, b, n_keys, bank_sizes, global_targets, in_batch_negatives):
    """(y, every rank's rows of y, the product index of the positives or None): the keys of the
    fused product on this rank, [key_r; bank_r] with in-batch negatives (a global key index t of
    rank s is product index product_offset_s + (t - key_offset_s)), else bank_r (or None)."""
    if not in_batch_negatives:
        return b, bank_sizes, None
    y = k if b is None else torch.cat([k, b])
    sizes = [m + kb for m, kb in zip(n_keys, bank_sizes)]
    device = k.device
    starts = torch.tensor([sum(n_keys[:s]) for s in range(len(n_keys))], device=device)
    shift = torch.tensor([sum(sizes[:s]) - sum(n_keys[:s]) for s in range(len(n_keys))],
                         device=device)
    owner = torch.searchsorted(starts, global_targets, right=True) - 1
    return y, sizes, global_targets + shift[owner]


def _float_code(value):
    """A float option as the int64 of its bits (the metadata exchange carries ints)."""
    return 0 if value is None else struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _mask_ids(options, global_rows_of_keys, global_targets, n_bank, query_ids, bank_ids):
    """(row_ids (N_r,), col_ids of this rank's product keys) of the id mask, or None: as
    fastcontrast.infonce (DCL / DCLW / HCL with in-batch keys mask each row's positive key,
    whose id is its global key index, and query_ids then mask a bank outside this product;
    else query_ids mask the bank entries of their id)."""
    over_negatives = options.decoupled or options.needs_host_terms
    if over_negatives and options.in_batch_negatives:
        device = global_targets.device
        cols = [global_rows_of_keys, torch.full((n_bank,), -1, dtype=torch.int64, device=device)]
        return global_targets.contiguous(), torch.cat(cols).contiguous()
    if query_ids is None:
        return None
    cols = [bank_ids]
    if options.in_batch_negatives:
        cols.insert(0, torch.full(global_rows_of_keys.shape, -1, dtype=torch.int64,
                                  device=query_ids.device))
    return query_ids.contiguous(), torch.cat(cols).contiguous()


def _check_global_targets(targets, m_total, exclude_self, global_rows):
    """The checks of targets' values that info_nce_args leaves to this layer (global_targets):
    they index the keys of all ranks, and with exclude_self differ from their row's global
    index."""
    check.check_target_range(targets, m_total, keys="the keys of all ranks", count="M_total")
    if exclude_self:
        check.check_targets_not_self(targets, global_rows, row="the global index of row i")


@output_dtype_policy
def info_nce(query, key, negatives=None, *, temperature=0.07, normalize=True, targets=None,
             in_batch_negatives=True, exclude_self=False, symmetric=False, reduction="mean",
             decoupled=False, dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, query_ids=None,
             negative_ids=None, backend="auto", mode="gather", group=None):
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
    bank: an entry of any rank's bank whose id equals the query's is not a candidate."""
    with _refusal(group, "info_nce", query):
        tau = args.info_nce_args(
            query, key, negatives, temperature=temperature, normalize=normalize,
            targets=targets, in_batch_negatives=in_batch_negatives, exclude_self=exclude_self,
            symmetric=symmetric, reduction=reduction, decoupled=decoupled,
            dclw_sigma=dclw_sigma, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus,
            query_ids=query_ids, negative_ids=negative_ids, global_targets=True)
        comm, name = _start("info_nce", mode, group, backend, query.device, query.dtype)
    options = InfoNCEOptions(name, in_batch_negatives=in_batch_negatives,
                             exclude_self=exclude_self, symmetric=symmetric, normalize=normalize,
                             reduction=reduction, decoupled=decoupled, dclw_sigma=dclw_sigma,
                             hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus)
    return _info_nce(comm, options, mode, query, key, negatives, tau.reciprocal(), targets,
                     query_ids, negative_ids)


def _info_nce(comm, options, mode, query, key, negatives, scale, targets, query_ids=None,
              negative_ids=None, q_name="query", targets_valid=False):
    """info_nce after the local checks (_loss_args.info_nce_args with global_targets, _start):
    the metadata exchange, the global checks and the fused loss at ``scale`` = 1 / temperature.
    ``q_name``: the caller's name of ``query`` (clip_loss: image) in the cross-rank errors;
    ``targets_valid``: the caller built the targets (nt_xent), so their
    values need no check."""
    name, reduction, normalize = options.backend, options.reduction, options.normalize
    in_batch_negatives, exclude_self = options.in_batch_negatives, options.exclude_self
    symmetric, decoupled = options.symmetric, options.decoupled
    neg_kind = 0 if negatives is None else negatives.dim()
    flags = (int(normalize) | int(in_batch_negatives) << 1 | int(exclude_self) << 2
             | int(symmetric) << 3 | int(targets is not None) << 4
             | int(query_ids is not None) << 5 | int(decoupled) << 6)
    table = _exchange(comm, query.device, [
        (None, query.shape[0]), (None, key.shape[0]),
        (f"the feature dimension D of {q_name}", query.shape[1]),
        (f"dtype of {q_name}", dtype_code(query.dtype)),
        ("the kind of negatives (None, 2-D bank or 3-D per-query)", neg_kind),
        (None, 0 if negatives is None else negatives.shape[-2]),
        ("the options normalize / in_batch_negatives / exclude_self / symmetric / targets / "
         "query_ids given / decoupled", flags), ("mode", _mode_code(mode)),
        ("reduction", REDUCTIONS.index(reduction)),
        ("dclw_sigma", _float_code(options.dclw_sigma)),
        ("hcl_beta", _float_code(options.hcl_beta)),
        ("hcl_tau_plus", _float_code(options.hcl_tau_plus))])
    if neg_kind == 3:
        comm.check_same(table, 5, "the number K of per-query negatives")
    n_rows, n_keys = [r[0] for r in table], [r[1] for r in table]
    n_total, m_total = sum(n_rows), sum(n_keys)
    rank = comm.rank
    key_offset = sum(n_keys[:rank])
    global_rows = torch.arange(key_offset, key_offset + query.shape[0], device=query.device)
    if targets is None:
        global_targets = global_rows
    else:
        if not targets_valid and check.reads_values(targets):
            # Values differ per rank: every rank learns of a refusal.
            comm.agree(lambda: _check_global_targets(targets, m_total, exclude_self,
                                                     global_rows), query.device)
        global_targets = targets
    cdt = _compute_dtype(name, query.dtype)
    q = _prepare(query, cdt, normalize)
    k = q if key is query else _prepare(key, cdt, normalize)
    bank = negatives if neg_kind == 2 else None
    over_negatives = options.decoupled or options.needs_host_terms
    bank_sizes = [r[5] for r in table] if bank is not None else [0] * comm.world
    b = None if bank is None else _prepare(bank, cdt, normalize)
    # The id mask holds one id per row: where the in-batch keys mask the positives (HCL) the
    # bank entries of the query's id need a product of their own (Candidates.bank_apart).
    split = over_negatives and in_batch_negatives and query_ids is not None
    in_product = [0] * comm.world if split else bank_sizes
    y, sizes, product_targets = _product(k, None if split else b, n_keys, in_product,
                                         global_targets, in_batch_negatives)
    key_rows = torch.arange(key_offset, key_offset + key.shape[0], device=query.device)
    ids = _mask_ids(options, key_rows, global_targets, in_product[rank], query_ids,
                    negative_ids)
    bank_apart = None
    if split:
        bank_apart = (b, Layout(tuple(n_rows), tuple(bank_sizes)),
                      (query_ids.contiguous(), negative_ids.contiguous()))
    positive_outside = None
    if not in_batch_negatives:  # the positive is not a key of the product
        if targets is None:
            positive_outside = (q * k).sum(dim=1).to(scale.dtype) * scale
        else:
            keys = AllGatherWithGrad.apply(k, comm, tuple(n_keys))
            positive_outside = (q * keys[global_targets]).sum(dim=1).to(scale.dtype) * scale
    per_query = _prepare(negatives, cdt, normalize) if neg_kind == 3 else None
    spec = LSESpec(mode, name, exclude_self and in_batch_negatives, symmetric)
    cand = Candidates(comm, spec, q, y, Layout(tuple(n_rows), tuple(sizes)), product_targets,
                      ids, per_query, positive_outside, scale, bank_apart)
    static = ((m_total - 1 - int(exclude_self)) if in_batch_negatives else 0) + sum(bank_sizes) \
        + (0 if per_query is None else per_query.shape[1])
    acc = torch.promote_types(scale.dtype, torch.float32)
    valid, counted, log_n = None, n_total, None
    if over_negatives:
        if static == 0:  # no row has a negative: 0, with a zero gradient, as single-process
            zero = torch.where(torch.zeros_like(q[:, 0], dtype=torch.bool), q[:, 0], 0.0)
            return _reduce(comm, zero, reduction, n_total)
        all_bank_ids = None if query_ids is None else all_gather_rows(
            comm, negative_ids.contiguous(), bank_sizes)
        counts = negative_counts(static, query.shape[0], query_ids, all_bank_ids, query.device,
                                 acc)
        log_n = counts.log()
        if query_ids is not None:
            valid = counts > 0
            counted = sum(r[0] for r in comm.exchange([int(valid.sum())], query.device))
    loss = row_losses(options, cand, scale, n_total, log_n, valid)
    return _reduce(comm, loss, reduction, counted)


@output_dtype_policy
def clip_loss(image, text, logit_scale, *, logit_bias=None, reduction="mean", backend="auto",
              mode="gather", group=None):
    """OpenCLIP's ClipLoss over the texts and images of every rank (symmetric: one pass gives
    the row and the column log-sum-exps). ``logit_scale`` is never all-reduced (DDP averages
    its gradient); ``logit_bias`` cancels and gets a zero gradient, as single-process."""
    with _refusal(group, "clip_loss", image):
        scale = args.clip_loss_args(image, text, logit_scale, logit_bias, reduction)
        comm, name = _start("clip_loss", mode, group, backend, image.device, image.dtype)
    options = InfoNCEOptions(name, normalize=False, symmetric=True, reduction=reduction)
    loss = _info_nce(comm, options, mode, image, text, None, scale, None, q_name="image")
    if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
        loss = loss + (0.0 * logit_bias.sum()).to(loss.dtype)
    return loss


@output_dtype_policy
def nt_xent(z1, z2, *, temperature=0.5, normalize=True, reduction="mean", decoupled=False,
            dclw_sigma=None, hcl_beta=0.0, hcl_tau_plus=0.0, backend="auto", mode="gather",
            group=None):
    """SimCLR's NT-Xent over the 2 N_total views of every rank: the positive of view z1_i is
    z2_i (same rank), the negatives every other view of every rank, self excluded (info_nce on
    each rank's views [z1_r; z2_r], targets into the global views). Per-rank batch sizes may
    differ. "none": (2 N_r,), this rank's [z1; z2] rows. DCL / DCLW / HCL options as in
    info_nce."""
    with _refusal(group, "nt_xent", z1):
        tau = args.nt_xent_args(z1, z2, temperature=temperature, normalize=normalize,
                                reduction=reduction, decoupled=decoupled, dclw_sigma=dclw_sigma,
                                hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus)
        comm, name = _start("nt_xent", mode, group, backend, z1.device, z1.dtype)
    table = _exchange(comm, z1.device, [
        (None, z1.shape[0]), ("the feature dimension D of z1", z1.shape[1]),
        ("dtype of z1", dtype_code(z1.dtype))])
    n = z1.shape[0]
    offset = sum(2 * r[0] for r in table[:comm.rank])
    local = torch.arange(2 * n, device=z1.device)
    views = torch.cat([z1, z2])
    options = InfoNCEOptions(name, exclude_self=True, normalize=normalize, reduction=reduction,
                             decoupled=decoupled, dclw_sigma=dclw_sigma, hcl_beta=hcl_beta,
                             hcl_tau_plus=hcl_tau_plus)
    return _info_nce(comm, options, mode, views, views, None, tau.reciprocal(),
                     offset + (local + n) % (2 * n), targets_valid=True)


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
    with _refusal(group, "supcon", features):
        tau = args.supcon_args(features, labels, temperature, reduction, normalize)
        n = features.shape[0]
        comm, name = _start("supcon", mode, group, backend, features.device, features.dtype)
    table = _exchange(comm, features.device, [
        (None, n), ("the number of dimensions of features", features.dim()),
        ("the shape[1:] of features", features.shape[1]),
        ("the feature dimension D of features", features.shape[-1]),
        ("dtype of features", dtype_code(features.dtype)), ("labels given", labels is not None),
        ("mode", _mode_code(mode)), ("normalize", int(normalize)),
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
    z = _prepare(features, _compute_dtype(name, features.dtype), normalize)
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
    return _reduce(comm, loss, reduction, anchors)


@output_dtype_policy
def siglip_loss(image, text, logit_scale, logit_bias, *, reduction="mean", backend="auto",
                mode="gather", group=None):
    """SigLIP's sigmoid loss of this rank's images against the texts of every rank (the
    positive of image i is its own text i). ``logit_scale`` / ``logit_bias`` are never
    all-reduced (DDP averages their gradients). "mean" divides by N_total (OpenCLIP)."""
    with _refusal(group, "siglip_loss", image):
        scale, bias = args.siglip_loss_args(image, text, logit_scale, logit_bias, reduction)
        comm, name = _start("siglip_loss", mode, group, backend, image.device, image.dtype)
    table = _exchange(comm, image.device, [
        (None, image.shape[0]), ("the feature dimension D of image", image.shape[1]),
        ("dtype of image", dtype_code(image.dtype)), ("mode", _mode_code(mode)),
        ("reduction", REDUCTIONS.index(reduction))])
    sizes = tuple(r[0] for r in table)
    cdt = _compute_dtype(name, image.dtype)
    loss = DistributedSigLIP.apply(image.to(cdt).contiguous(), text.to(cdt).contiguous(), scale,
                                   bias, comm, Layout(sizes, sizes), mode, name)
    return _reduce(comm, loss, reduction, sum(sizes))


@output_dtype_policy
def moco_loss(query, key, queue, *, temperature=0.07, normalize=True, reduction="mean",
              query_index=None, decoupled=False, hcl_beta=0.0, hcl_tau_plus=0.0,
              backend="auto", mode="gather", group=None):
    """MoCo's loss: the positive is the rank's own key, the negatives the queue, which every
    rank holds identically (keep it so with enqueue_all), so nothing but the batch sizes is
    communicated (``mode`` is accepted for symmetry). The returned loss follows the group
    convention; DCL / HCL options and ``query_index`` as single-process (with query_index and
    DCL / HCL, "mean" is over the rows of all ranks that kept a negative)."""
    with _refusal(group, "moco_loss", query):
        check.check_choice("mode", mode, MODES)
        bank, bank_ids = args.unwrap_queue(queue, query_index)
        args.moco_loss_args(query, key, bank, bank_ids, temperature=temperature,
                            normalize=normalize, reduction=reduction, query_index=query_index,
                            decoupled=decoupled, hcl_beta=hcl_beta, hcl_tau_plus=hcl_tau_plus)
        resolve(backend, query.device, dtype=query.dtype)
        comm = Comm(group, caller="fastcontrast.distributed.moco_loss")
    _exchange(comm, query.device, [
        (None, query.shape[0]), ("the feature dimension D of query", query.shape[1]),
        ("dtype of query", dtype_code(query.dtype)),
        ("reduction", REDUCTIONS.index(reduction)), ("decoupled", int(decoupled)),
        ("hcl_beta", _float_code(hcl_beta)), ("hcl_tau_plus", _float_code(hcl_tau_plus))])
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
                                                backend=backend)
    except (TypeError, ValueError):
        if reduction != "none":  # the others wait in the exchange of the counts below
            comm.exchange([0], query.device, failed=True)
        raise
    if reduction == "none":
        return loss
    counted = query.shape[0]
    if query_index is not None and (decoupled or hcl_beta or hcl_tau_plus):
        counts = negative_counts(bank_ids.shape[0], query.shape[0], query_index, bank_ids,
                                 query.device, torch.float64)
        counted = int((counts > 0).sum())
    total = sum(r[0] for r in comm.exchange([counted], query.device))
    scaled = loss * comm.world
    return scaled / max(total, 1) if reduction == "mean" else scaled


@torch.no_grad()
def enqueue_all(queue, keys, labels=None, indices=None, *, group=None):
    """Enqueue the keys (and labels / indices) of every rank of ``group`` into ``queue`` (a
    NegativeQueue), in rank order, on every rank: the queues of all ranks stay identical.
    Batch sizes may differ per rank. One all_gather per tensor."""
    with _refusal(group, "enqueue_all", keys):
        comm = Comm(group, caller="fastcontrast.distributed.enqueue_all")
        check.check_tensor("keys", keys, (2,))
    table = _exchange(comm, keys.device, [
        (None, keys.shape[0]), ("the feature dimension D of keys", keys.shape[1]),
        ("dtype of keys", dtype_code(keys.dtype)), ("labels given", labels is not None),
        ("indices given", indices is not None)])
    sizes = [r[0] for r in table]
    gathered = [None if t is None else all_gather_rows(comm, t.detach().contiguous(), sizes)
                for t in (keys, labels, indices)]
    queue.enqueue(gathered[0], labels=gathered[1], indices=gathered[2])
