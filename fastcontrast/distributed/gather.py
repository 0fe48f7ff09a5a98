"""Gather mode: every rank all-gathers the keys (O(M_total D) per rank, one all_gather), runs
its own rows against all of them in one call of the fused kernels, and never forms the logits.

Symmetric losses need the column log-sum-exp of every key over every rank's rows: each rank's
partial col_lse (M_total,) is merged across ranks in log space (all_reduce of the max, then of
the sum of exp; O(M_total) floats). The backward all-gathers the column upstream weights of all
keys (O(M_total) floats), forms dx of its rows and its partial d(keys) (M_total, D) in one kernel
call, and reduce-scatters the partial key gradients (all-reduce and slice on gloo), so that each
rank's keys get the gradient of the sum of all ranks' losses.
"""
from .._host import accumulate_dtype
from .blocks import (lse_block_backward, lse_block_forward, siglip_block_backward,
                     siglip_block_forward)
from .collectives import all_gather_rows, all_reduce_logsumexp, reduce_scatter_rows

__all__ = ["lse_forward", "lse_backward", "siglip_forward", "siglip_backward"]


def _all_ids(comm, layout, ids):
    """(row_ids, the column ids of every rank's keys) of the id mask, or (None, None)."""
    if ids is None:
        return None, None
    return ids[0], all_gather_rows(comm, ids[1].contiguous(), layout.keys)


def _filter_payload(comm, layout, row_filter):
    """Every rank's filter payload (guide keys, column thresholds: RowFilter.payload),
    gathered with the keys; [] without a filter."""
    if row_filter is None:
        return []
    return [all_gather_rows(comm, t.contiguous(), layout.keys) for t in row_filter.payload()]


def _filter_of(row_filter, m, payload):
    return None if row_filter is None else row_filter.block(0, m, payload)


def lse_forward(comm, layout, spec, x, scale, y, targets, ids, row_filter=None):
    """(row_lse (N,), col_lse of this rank's keys (M_r,) or None, positive (N,) or None,
    saved tensors for lse_backward). ``ids``: (row_ids (N,), col_ids of this rank's keys) of
    the id mask, or None; ``row_filter``: the false-negative filter (its guide keys and, for a
    symmetric loss, its column thresholds gathered with the keys), or None."""
    keys = all_gather_rows(comm, y.contiguous(), layout.keys)
    off = layout.key_offset(comm.rank)
    positive = None if targets is None else x.new_zeros(x.shape[0], dtype=accumulate_dtype(x.dtype))
    payload = _filter_payload(comm, layout, row_filter)
    row_lse, col_part = lse_block_forward(x, scale, keys, 0, off if spec.exclude_self else None,
                                          spec.with_col, targets, positive, spec.backend,
                                          *_all_ids(comm, layout, ids),
                                          lse_filter=_filter_of(row_filter, keys.shape[0],
                                                                payload))
    col_all = all_reduce_logsumexp(comm, col_part) if spec.with_col else None
    col_lse = col_all[off:off + layout.keys[comm.rank]] if spec.with_col else None
    return row_lse, col_lse, positive, (keys, col_all, *payload)


def lse_backward(comm, layout, spec, x, scale, y, targets, ids, row_lse, saved, g, c, g_pos,
                 row_filter=None):
    """(dx (N, D), dy (M_r, D)) in the accumulation dtype: the gradient of the sum of all ranks'
    losses."""
    keys, col_all, *payload = saved
    off = layout.key_offset(comm.rank)
    c_all = all_gather_rows(comm, c.to(row_lse.dtype).contiguous(), layout.keys) \
        if spec.with_col else None
    dx, dkeys = lse_block_backward(x, scale, keys, 0, off if spec.exclude_self else None,
                                   row_lse, g, col_all, c_all, targets, g_pos, True, spec.backend,
                                   *_all_ids(comm, layout, ids),
                                   lse_filter=_filter_of(row_filter, keys.shape[0], payload))
    return dx, reduce_scatter_rows(comm, dkeys, layout.keys)


def siglip_forward(comm, layout, backend, x, y, scale, bias):
    """(per-row loss (N,) of this rank's rows over every rank's texts, saved tensors)."""
    texts = all_gather_rows(comm, y.contiguous(), layout.keys)
    loss = siglip_block_forward(x, texts, scale, bias, 0, layout.key_offset(comm.rank), backend)
    return loss, (texts,)


def siglip_backward(comm, layout, backend, x, y, scale, bias, saved, g):
    """(gx, gy of this rank's texts, d scale, d bias), gx / gy before the factor scale."""
    (texts,) = saved
    gx, gy, dscale, dbias = siglip_block_backward(x, texts, scale, bias, 0,
                                                  layout.key_offset(comm.rank), g, True, backend)
    return gx, reduce_scatter_rows(comm, gy, layout.keys), dscale, dbias

