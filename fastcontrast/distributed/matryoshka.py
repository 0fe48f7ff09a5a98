"""Matryoshka prefixes over the keys of every rank (fastcontrast/infonce/matryoshka.py on the
concatenated batch): the weighted sum over leading-dimension prefixes d_1 < ... < d_P of the
distributed loss on the first d_p features,

    loss = sum_p w_p loss(q[:, :d_p], k[:, :d_p])        (w_p = 1 by default),

each prefix L2-normalised on its own when the loss normalises (info_nce, nt_xent; clip_loss
takes the prefixes as given). The group convention holds per prefix, so it holds for the sum.

mode "gather": one fused pass for all prefixes. The candidates of every rank (keys, then bank)
are all-gathered with autograd (AllGatherWithGrad: the backward reduce-scatters their
gradients, so each rank's keys get the gradient of every rank's loss), the per-prefix inverse
norms are computed from them in O((N_r + M_total) D), and this rank's rows run the
single-process Matryoshka op (infonce/matryoshka_ops.py: the P log-sum-exps in one pass over
the key tiles) against all of them. exclude_self (nt_xent) takes this rank's own keys apart,
a square block whose diagonal the op masks, and merges the two row log-sum-exps. A symmetric
loss (clip_loss), loss_i = (row_lse_i + col_lse_i) / 2 - s_ii per prefix, takes the column
log-sum-exps from the same pass: each rank's partial (P, M_total) over its own rows, merged
across ranks in log space with autograd (max, then an all-reduce of the sum of exp; O(P M_total)
floats), so the gradient of every entry (i, j), the scalars' included, lands on the rank of
row i, as in the other distributed losses.

mode "ring": the distributed ring pass once per prefix (P metadata exchanges and passes, each
moving d_p of the D features), keeping ring mode's memory bound (no rank holds every key).

The options that single-process Matryoshka refuses are refused here with the same
NotImplementedError, before any communication."""

import torch

from .. import _validation as check
from .. import backends
from .._host import REDUCTIONS, accumulate_dtype, non_negative_value
from ..infonce.matryoshka import _chunk_sums, _inverse_norms, matryoshka_unsupported
from ..infonce.matryoshka_ops import matryoshka_lse
from .calls import exchange, group_reduce, prefix_code
from .collectives import AllGatherWithGrad, all_reduce_logsumexp_with_grad, dtype_code
from .global_infonce import _check_global_targets, global_info_nce

__all__ = ["check_matryoshka", "prefix_sum", "distributed_matryoshka"]


def check_matryoshka(options, negatives=None, query_ids=None, labels=(None, None)):
    """The single-process refusal (infonce.matryoshka.matryoshka_unsupported), raised before any
    communication: every rank makes the same call, so every rank raises."""
    error = matryoshka_unsupported(options, negatives, query_ids, labels)
    if error is not None:
        raise error


def prefix_sum(dims, weights, loss_at):
    """sum_p w_p loss_at(cut_p), cut_p(t) the first d_p features of t (None stays None): one
    distributed loss per prefix, each with its own exchange, normalisation and pass."""
    total = None
    for d, w in zip(dims, weights):
        def cut(t, d=d):
            return None if t is None else t[..., :d]
        loss = w * loss_at(cut)
        total = loss if total is None else total + loss
    return total


def _gather_fused(comm, options, query, key, bank, scale, targets, q_name, targets_valid):
    """Mode "gather": this rank's share of the loss, all prefixes in one fused pass."""
    flags = (int(options.normalize) | int(options.exclude_self) << 1
             | int(options.symmetric) << 2 | int(targets is not None) << 3)
    table = exchange(comm, query.device, [
        ("matryoshka_dims / matryoshka_weights", prefix_code(options)),  # first: as info_nce's
        (None, query.shape[0]), (None, key.shape[0]), (None, 0 if bank is None else bank.shape[0]),
        (f"the feature dimension D of {q_name}", query.shape[1]),
        (f"dtype of {q_name}", dtype_code(query.dtype)),
        ("negatives given", int(bank is not None)),
        ("the options normalize / exclude_self / symmetric / targets given", flags),
        ("reduction", REDUCTIONS.index(options.reduction))])
    n_rows, n_keys = [r[1] for r in table], [r[2] for r in table]
    offset = sum(n_keys[:comm.rank])
    own = torch.arange(offset, offset + query.shape[0], device=query.device)
    if targets is not None and not targets_valid and check.reads_values(targets):
        # Values differ per rank: every rank learns of a refusal.
        comm.agree(lambda: _check_global_targets(targets, sum(n_keys), options.exclude_self,
                                                 own), query.device)
    candidates = AllGatherWithGrad.apply(key.contiguous(), comm, tuple(n_keys))
    if bank is not None:
        candidates = torch.cat([candidates, AllGatherWithGrad.apply(
            bank.contiguous(), comm, tuple(r[3] for r in table))])
    loss = _row_losses(comm, options, query, candidates, scale,
                       own if targets is None else targets, offset)
    return group_reduce(comm, loss, options.reduction, sum(n_rows))


def _row_losses(comm, options, query, candidates, scale, targets, offset):
    """sum_p w_p loss^p_i (N_r,) of this rank's rows against every rank's ``candidates``
    (keys in rank order, then banks; this rank's keys from ``offset``), ``targets`` the global
    index of each row's positive, with autograd."""
    acc = accumulate_dtype(query.dtype)
    compute = backends.PROPERTIES[options.backend].compute_dtype(query.dtype)
    bounds = (0, *options.matryoshka_dims)
    n = query.shape[0]
    q_acc, c_acc = query.to(acc), candidates.to(acc)
    if options.normalize:
        inv_q, inv_c = (_inverse_norms(t, bounds, options.eps) for t in (q_acc, c_acc))
    else:
        inv_q, inv_c = q_acc.new_ones(len(bounds) - 1, n), c_acc.new_ones(len(bounds) - 1,
                                                                           c_acc.shape[0])
    alpha = inv_q * scale.to(acc)
    x, y = query.to(compute), candidates.to(compute)
    kw = dict(bounds=bounds, backend=options.backend)
    own = slice(offset, offset + n)
    if options.exclude_self:  # own keys: a square block, its diagonal masked by the op
        row_lse = matryoshka_lse(x, y[own], alpha, inv_c[:, own], exclude_diag=True,
                                 with_col_lse=False, **kw)[0].to(acc)
        if y.shape[0] > n:
            rest = torch.cat([y[:offset], y[offset + n:]])
            beta = torch.cat([inv_c[:, :offset], inv_c[:, offset + n:]], dim=1)
            row_lse = torch.logaddexp(row_lse, matryoshka_lse(
                x, rest, alpha, beta, exclude_diag=False, with_col_lse=False, **kw)[0].to(acc))
    else:
        row_lse, col_partial = matryoshka_lse(x, y, alpha, inv_c, exclude_diag=False,
                                              with_col_lse=options.symmetric, **kw)
        row_lse = row_lse.to(acc)
        if options.symmetric:  # N_r = M_r, no bank: key i's column over the rows of all ranks
            col_lse = all_reduce_logsumexp_with_grad(comm, col_partial.to(acc))
            row_lse = 0.5 * (row_lse + col_lse[:, own])
    positive = alpha * inv_c[:, targets] * _chunk_sums(q_acc, c_acc[targets], bounds)
    loss = row_lse - positive
    if candidates.shape[0] - int(options.exclude_self) == 1:  # the positive alone: exactly 0
        loss = loss * 0
    else:  # >= 0 as its value is: the lse and the positive are rounded apart
        loss = non_negative_value(loss)
    weights = loss.new_tensor(options.matryoshka_weights).unsqueeze(1)
    return (weights * loss).sum(dim=0)


def distributed_matryoshka(comm, options, mode, query, key, bank, scale, targets,
                           q_name="query", targets_valid=False):
    """The Matryoshka loss of the module docstring for info_nce / clip_loss / nt_xent after the
    local checks (check_matryoshka passed; options carries the prefixes and weights), reduced by
    the group convention. ``bank``: this rank's share of a shared bank (K_r, D) or None."""
    if mode == "gather":
        return _gather_fused(comm, options, query, key, bank, scale, targets, q_name,
                             targets_valid)

    def at(cut):
        q = cut(query)
        k = q if key is query else cut(key)  # one set (nt_xent): prepared once
        return global_info_nce(comm, options, mode, q, k, cut(bank), scale, targets,
                               q_name=q_name, targets_valid=targets_valid)

    return prefix_sum(options.matryoshka_dims, options.matryoshka_weights, at)
