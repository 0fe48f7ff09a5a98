"""Ring mode: the key blocks of the ranks travel around the ring r -> r + 1 (point-to-point
isend / irecv, batch_isend_irecv), so that no rank ever holds more than its own block, the one
it computes on and the one arriving (double buffering).

At step t = 0 .. W-1 rank r computes on the block of rank s = r - t (mod W). The transfer of the
next block is posted before the step's compute (overlap). Accumulators that belong to a block
(the partial column log-sum-exps in the forward, the fp32 key-gradient sums in the backward)
travel with it, each rank merging in its share; after the last step they are one hop from home
and take it. Each step's transfers are one batch: [accumulators of the block computed last step
-> r + 1, accumulators of this step's block <- r - 1, this block -> r + 1, the next block <-
r - 1], the same on every rank, so NCCL's grouped point-to-point cannot wait in a circle.

Peers are the ranks r +- 1 of the group, turned into global ranks (Comm.global_rank).
Blocks may differ in size across ranks (every rank knows every rank's sizes from the metadata
exchange).
"""
import torch
import torch.distributed as dist

from .._host import accumulate_dtype
from .blocks import (lse_block_backward, lse_block_forward, siglip_block_backward,
                     siglip_block_forward)

__all__ = ["circulate", "lse_forward", "lse_backward", "siglip_forward", "siglip_backward"]


def _ops(kind, tensors, peer, group):
    return [dist.P2POp(kind, t, peer, group) for t in tensors]


def _wait(ops):
    if ops:
        for req in dist.batch_isend_irecv(ops):
            req.wait()


def circulate(comm, payload, payload_like, acc_like, compute, merge):
    """Pass every rank's ``payload`` (a list of tensors) around the ring.

    payload_like(s) / acc_like(s): empty tensors shaped as rank s's payload / accumulators;
    compute(s, block) -> the partial accumulators (a list) of rank s's block from this rank;
    merge(accumulated, partial) -> the merged accumulator. Returns this rank's own
    accumulators with every rank's share merged in (empty list when there are none)."""
    world, rank, group = comm.world, comm.rank, comm.group
    nxt, prv = comm.global_rank(rank + 1), comm.global_rank(rank - 1)
    block, pending = [t.contiguous() for t in payload], None
    for t in range(world):
        source = (rank - t) % world
        ops, arriving, incoming = [], None, None
        if pending:  # the accumulators of last step's block go on; this block's arrive
            arriving = acc_like(source)
            ops += _ops(dist.isend, pending, nxt, group) + _ops(dist.irecv, arriving, prv, group)
        if t < world - 1:
            incoming = payload_like((source - 1) % world)
            ops += _ops(dist.isend, block, nxt, group) + _ops(dist.irecv, incoming, prv, group)
        reqs = dist.batch_isend_irecv(ops) if ops else []
        partial = compute(source, block)  # overlaps the transfers posted above
        for req in reqs:
            req.wait()
        pending = partial if arriving is None else [merge(a, p) for a, p in zip(arriving, partial)]
        block = incoming
    if world == 1 or not pending:
        return pending or []
    home = acc_like(rank)
    _wait(_ops(dist.isend, pending, nxt, group) + _ops(dist.irecv, home, prv, group))
    return home


def _offsets(sizes):
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


def lse_forward(comm, layout, spec, x, scale, y, targets):
    """(row_lse (N,), col_lse of this rank's keys (M_r,) or None, positive (N,) or None,
    saved tensors for lse_backward)."""
    acc = accumulate_dtype(x.dtype)
    key_off = _offsets(layout.keys)
    row_lse = torch.full((x.shape[0],), float("-inf"), dtype=acc, device=x.device)
    positive = None if targets is None else torch.zeros(x.shape[0], dtype=acc, device=x.device)

    def compute(s, block):
        nonlocal row_lse
        diag = 0 if (spec.exclude_self and s == comm.rank) else None
        part, col = lse_block_forward(x, scale, block[0], key_off[s], diag, spec.with_col,
                                      targets, positive, spec.backend)
        row_lse = torch.logaddexp(row_lse, part)
        return [col] if spec.with_col else []

    d = y.shape[1]
    col = circulate(comm, [y], lambda s: [y.new_empty(layout.keys[s], d)],
                    lambda s: ([torch.empty(layout.keys[s], dtype=acc, device=x.device)]
                               if spec.with_col else []),
                    compute, torch.logaddexp)
    col_lse = col[0] if spec.with_col else None
    return row_lse, col_lse, positive, (col_lse,)


def lse_backward(comm, layout, spec, x, scale, y, targets, row_lse, saved, g, c, g_pos):
    """(dx (N, D), dy (M_r, D)) in the accumulation dtype: the gradient of the sum of all ranks'
    losses; the key gradients travel home with their block."""
    acc = accumulate_dtype(x.dtype)
    key_off = _offsets(layout.keys)
    (col_lse,) = saved
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    d = y.shape[1]
    payload = [y] + ([c.to(acc).contiguous(), col_lse] if spec.with_col else [])

    def payload_like(s):
        m = layout.keys[s]
        extra = [torch.empty(m, dtype=acc, device=x.device) for _ in range(2)]
        return [y.new_empty(m, d)] + (extra if spec.with_col else [])

    def compute(s, block):
        diag = 0 if (spec.exclude_self and s == comm.rank) else None
        c_s, col_s = (block[1], block[2]) if spec.with_col else (None, None)
        dx_part, dy_part = lse_block_backward(x, scale, block[0], key_off[s], diag, row_lse, g,
                                              col_s, c_s, targets, g_pos, True, spec.backend)
        dx.add_(dx_part)
        return [dy_part]

    (dy,) = circulate(comm, payload, payload_like,
                      lambda s: [torch.empty(layout.keys[s], d, dtype=acc, device=x.device)],
                      compute, torch.add)
    return dx, dy


def siglip_forward(comm, layout, backend, x, y, scale, bias):
    """(per-row loss (N,) of this rank's rows over every rank's texts, saved tensors)."""
    acc = accumulate_dtype(x.dtype)
    off = _offsets(layout.keys)
    loss = torch.zeros(x.shape[0], dtype=acc, device=x.device)

    def compute(s, block):
        loss.add_(siglip_block_forward(x, block[0], scale, bias, off[s], off[comm.rank],
                                       backend))
        return []

    circulate(comm, [y], lambda s: [y.new_empty(layout.keys[s], y.shape[1])], lambda s: [],
              compute, torch.add)
    return loss, ()


def siglip_backward(comm, layout, backend, x, y, scale, bias, saved, g):
    """(gx, gy of this rank's texts, d scale, d bias), gx / gy before the factor scale."""
    acc = accumulate_dtype(x.dtype)
    off = _offsets(layout.keys)
    gx = torch.zeros(x.shape, dtype=acc, device=x.device)
    sums = [torch.zeros((), dtype=acc, device=x.device) for _ in range(2)]

    def compute(s, block):
        gx_part, gy_part, dscale, dbias = siglip_block_backward(
            x, block[0], scale, bias, off[s], off[comm.rank], g, True, backend)
        gx.add_(gx_part)
        sums[0] += dscale
        sums[1] += dbias
        return [gy_part]

    (gy,) = circulate(comm, [y], lambda s: [y.new_empty(layout.keys[s], y.shape[1])],
                      lambda s: [torch.empty(layout.keys[s], y.shape[1], dtype=acc,
                                             device=x.device)], compute, torch.add)
    return gx, gy, sums[0], sums[1]
