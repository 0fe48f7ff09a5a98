"""InfoNCE over the keys of every rank, after the local checks of the public call (info_nce,
clip_loss and nt_xent of fastcontrast.distributed.api end here): the metadata exchange, the
global index of the positives and its checks, the keys of this rank's fused product
[key_r; bank_r] and the index of the positives in it, the id masks, and the objectives' counts
of negatives over all ranks.

The plain objective of row i of rank r, with scale = 1 / temperature (clip_loss: logit_scale),

    loss_i = logsumexp_{j candidate} s_ij - s_{i, t_i},   s_ij = scale * <q_i, y_j>,

where y runs over the keys and banks of every rank (and row i's per-query negatives), t_i is
the GLOBAL index of its positive (the keys of all ranks in rank order), and exclude_self and
the ids remove candidates as single-process; DCL / DCLW / HCL are objectives.row_losses', the
log-sum-exps ops.DistributedLSE's; label smoothing adds label_smoothing.global_smoothing_gap;
with labels (multiple positives) the loss is multi_positive.global_multi_positive's.
"""
import torch

from .. import _validation as check
from .._host import REDUCTIONS
from .calls import (compute_dtype, exchange, float_code, group_reduce, mode_code, prefix_code,
                    prepare)
from .collectives import AllGatherWithGrad, all_gather_rows, dtype_code
from .false_negatives import check_margins, dropped_counts, filter_code, row_filter
from .label_smoothing import global_smoothing_gap
from .multi_positive import global_multi_positive
from .objectives import Candidates, negative_counts, row_losses
from .ops import Layout, LSESpec


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


def global_info_nce(comm, options, mode, query, key, negatives, scale, targets, query_ids=None,
                    negative_ids=None, q_name="query", targets_valid=False, labels=None,
                    false_negatives=None, return_dropped=False):
    """info_nce after the local checks (_loss_args.info_nce_args with global_targets,
    calls.start_call): the metadata exchange, the global checks and the fused loss at ``scale``
    = 1 / temperature. ``q_name``: the caller's name of ``query`` (clip_loss: image) in the
    cross-rank errors; ``targets_valid``: the caller built the targets (nt_xent), so their
    values need no check; ``labels``: (query_labels, key_labels) of this rank (multiple
    positives, targets None) or None. ``false_negatives``: a FalseNegatives filter
    (false_negatives.py; symmetric: both directions' rules in the same pass),
    ``return_dropped``: (loss, dropped (N_r,), symmetric (2, N_r)) with it."""
    name, reduction, normalize = options.backend, options.reduction, options.normalize
    in_batch_negatives, exclude_self = options.in_batch_negatives, options.exclude_self
    symmetric, decoupled = options.symmetric, options.decoupled
    neg_kind = 0 if negatives is None else negatives.dim()
    flags = (int(normalize) | int(in_batch_negatives) << 1 | int(exclude_self) << 2
             | int(symmetric) << 3 | int(targets is not None) << 4
             | int(query_ids is not None) << 5 | int(decoupled) << 6
             | int(labels is not None) << 7)
    # The prefixes first: a rank without them (one call) or with others fails on the first
    # column, whatever the other columns hold (Matryoshka's exchange starts the same way).
    table = exchange(comm, query.device, [
        ("matryoshka_dims / matryoshka_weights", prefix_code(options)),
        (None, query.shape[0]), (None, key.shape[0]),
        (f"the feature dimension D of {q_name}", query.shape[1]),
        (f"dtype of {q_name}", dtype_code(query.dtype)),
        ("the kind of negatives (None, 2-D bank or 3-D per-query)", neg_kind),
        (None, 0 if negatives is None else negatives.shape[-2]),
        ("the options normalize / in_batch_negatives / exclude_self / symmetric / targets / "
         "query_ids given / decoupled / labels given", flags), ("mode", mode_code(mode)),
        ("reduction", REDUCTIONS.index(reduction)),
        ("dclw_sigma", float_code(options.dclw_sigma)),
        ("hcl_beta", float_code(options.hcl_beta)),
        ("hcl_tau_plus", float_code(options.hcl_tau_plus)),
        ("label_smoothing", float_code(options.label_smoothing)),
        *filter_code(false_negatives, return_dropped)])
    if neg_kind == 3:
        comm.check_same(table, 6, "the number K of per-query negatives")
    if false_negatives is not None:
        check_margins(comm, query.device, false_negatives)
    n_rows, n_keys = [r[1] for r in table], [r[2] for r in table]
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
    cdt = compute_dtype(name, query.dtype)
    q = prepare(query, cdt, normalize)
    k = q if key is query else prepare(key, cdt, normalize)
    bank = negatives if neg_kind == 2 else None
    over_negatives = options.decoupled or options.needs_host_terms
    bank_sizes = [r[6] for r in table] if bank is not None else [0] * comm.world
    b = None if bank is None else prepare(bank, cdt, normalize)
    # The id mask holds one id per row: where the in-batch keys mask the positives (HCL) the
    # bank entries of the query's id need a product of their own (Candidates.bank_apart).
    split = over_negatives and in_batch_negatives and query_ids is not None
    in_product = [0] * comm.world if split else bank_sizes
    y, sizes, product_targets = _product(k, None if split else b, n_keys, in_product,
                                         global_targets, in_batch_negatives)
    if labels is not None:  # the positives are classes of keys, not one column per row
        product_targets = None
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
    per_query = prepare(negatives, cdt, normalize) if neg_kind == 3 else None
    spec = LSESpec(mode, name, exclude_self and in_batch_negatives, symmetric)
    filt = None if false_negatives is None else row_filter(
        comm, mode, false_negatives, q, k, scale, n_keys=n_keys,
        global_targets=None if targets is None else global_targets,
        product_targets=product_targets, guide_product=in_batch_negatives,
        first_row=key_offset if symmetric else None)
    cand = Candidates(comm, spec, q, y, Layout(tuple(n_rows), tuple(sizes)), product_targets,
                      ids, per_query, positive_outside, scale, bank_apart, filt)
    if labels is not None:
        return global_multi_positive(comm, options, cand, q, k, labels, scale, n_rows, n_keys)
    static = ((m_total - 1 - int(exclude_self)) if in_batch_negatives else 0) + sum(bank_sizes) \
        + (0 if per_query is None else per_query.shape[1])
    acc = torch.promote_types(scale.dtype, torch.float32)
    valid, counted, log_n = None, n_total, None
    if over_negatives:
        if static == 0:  # no row has a negative: 0, with a zero gradient, as single-process
            zero = torch.where(torch.zeros_like(q[:, 0], dtype=torch.bool), q[:, 0], 0.0)
            return group_reduce(comm, zero, reduction, n_total)
        all_bank_ids = None if query_ids is None else all_gather_rows(
            comm, negative_ids.contiguous(), bank_sizes)
        counts = negative_counts(static, query.shape[0], query_ids, all_bank_ids, query.device,
                                 acc)
        log_n = counts.log()
        if query_ids is not None:
            valid = counts > 0
            counted = sum(r[0] for r in comm.exchange([int(valid.sum())], query.device))
    loss = row_losses(options, cand, scale, n_total, log_n, valid)
    if options.label_smoothing:
        gap = global_smoothing_gap(
            comm, options, q, k, b, per_query, scale,
            targets=None if targets is None else global_targets, n_rows=n_rows, n_keys=n_keys,
            bank_sizes=bank_sizes, query_ids=query_ids, bank_ids=negative_ids)
        loss = loss + options.label_smoothing * gap.to(loss.dtype)
    loss = group_reduce(comm, loss, reduction, counted)
    return (loss, dropped_counts(cand, filt)) if return_dropped else loss

