"""The two autograd.Functions of fastcontrast.distributed, each dispatching to gather.py or
ring.py by ``mode``:

    DistributedLSE(x, scale, y, targets,    this rank's rows x (N_r, D) (normalised when the loss
                   row_ids, col_ids)        normalises) against the keys of every rank (y: this
        -> row_lse (N_r,), col_lse (M_r,),  rank's M_r keys); s_ij = scale <x_i, y_j>, entry
           positive (N_r,)                  (i, i) of the global index masked with exclude_self,
                                            entries with row_ids_i == col_ids_j >= 0 masked
                                            (col_ids: this rank's keys' ids; both or None);
                                            positive_i = s_{i, targets_i} (global key index);
                                            optional row_filter: the false-negative filter
                                            (false_negatives.RowFilter; no gradient)
    DistributedSigLIP(x, y, scale, bias)    per-row SigLIP loss (N_r,) over every rank's texts
        -> loss (N_r,)

Backward: each rank's autograd hands in the gradient of its own loss with respect to its own
outputs; the Function returns the gradient of the SUM of all ranks' losses with respect to its
inputs (the column weights of every key are all-gathered, the key gradients summed over ranks).
The scalar gradients (scale, bias) are this rank's share, sum_i <dx_i, x_i> / scale over its rows:
summed over the ranks they give the gradient of the sum, so DDP's average is the single-process
gradient. They are never all-reduced here.
"""
from dataclasses import dataclass

import torch

from .._host import rowwise_dot
from . import gather, ring

__all__ = ["Layout", "LSESpec", "DistributedLSE", "DistributedSigLIP"]


@dataclass(frozen=True)
class Layout:
    """Rows and keys of every rank (group-rank order), from the metadata exchange."""

    rows: tuple
    keys: tuple

    def key_offset(self, rank):
        return sum(self.keys[:rank])


@dataclass(frozen=True)
class LSESpec:
    mode: str
    backend: str
    exclude_self: bool
    with_col: bool


def _impl(mode):
    return gather if mode == "gather" else ring


def _empty(like):
    return like.new_empty(0)


class DistributedLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, y, targets, row_ids, col_ids, comm, layout, spec, row_filter=None):
        ids = None if row_ids is None else (row_ids, col_ids)
        row_lse, col_lse, positive, saved = _impl(spec.mode).lse_forward(
            comm, layout, spec, x, scale, y, targets, ids, row_filter)
        ctx.comm, ctx.layout, ctx.spec, ctx.row_filter = comm, layout, spec, row_filter
        ctx.save_for_backward(x, scale, y, targets, row_ids, col_ids, row_lse, *saved)
        return (row_lse, _empty(row_lse) if col_lse is None else col_lse,
                _empty(row_lse) if positive is None else positive)

    @staticmethod
    def backward(ctx, g, c, g_pos):
        x, scale, y, targets, row_ids, col_ids, row_lse, *saved = ctx.saved_tensors
        spec = ctx.spec
        ids = None if row_ids is None else (row_ids, col_ids)
        dx, dy = _impl(spec.mode).lse_backward(
            ctx.comm, ctx.layout, spec, x, scale, y, targets, ids, row_lse, saved, g,
            c if spec.with_col else None, g_pos if targets is not None else None,
            ctx.row_filter)
        dscale = None
        if ctx.needs_input_grad[1]:
            dscale = (rowwise_dot(x, dx).sum() / scale.to(dx.dtype)).to(scale.dtype)
        return dx.to(x.dtype), dscale, dy.to(y.dtype), None, None, None, None, None, None, None


class DistributedSigLIP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, scale, bias, comm, layout, mode, backend):
        loss, saved = _impl(mode).siglip_forward(comm, layout, backend, x, y, scale, bias)
        ctx.comm, ctx.layout, ctx.mode, ctx.backend = comm, layout, mode, backend
        ctx.save_for_backward(x, y, scale, bias, *saved)
        return loss

    @staticmethod
    def backward(ctx, g):
        x, y, scale, bias, *saved = ctx.saved_tensors
        gx, gy, dscale, dbias = _impl(ctx.mode).siglip_backward(
            ctx.comm, ctx.layout, ctx.backend, x, y, scale, bias, saved, g)
        s = scale.to(gx.dtype)
        return ((gx * s).to(x.dtype), (gy * s).to(y.dtype), dscale.to(scale.dtype),
                dbias.to(bias.dtype), None, None, None, None)
