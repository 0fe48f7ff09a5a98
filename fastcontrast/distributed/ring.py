"""Ring mode: the key blocks of the ranks travel around the ring r -> r + 1 (point-to-point
isend / irecv, batch_isend_irecv), so that no rank ever holds more than its own block, the one
it computes on and the one arriving (double buffering), plus, in the backward, one fp32
key-gradient accumulator.

At step t = 0 .. W-1 rank r computes on the block of rank s = r - t (mod W). The transfer of the
next key block is posted before the step's compute (overlap).

Forward (``circulate``): the partial column log-sum-exps (O(M_s) floats) travel with their block,
one step behind it, each rank merging in its share; after the last step they are one hop from
home and take it. Each step's transfers are one batch: [statistics of the block computed last
step -> r + 1, statistics of this step's block <- r - 1, this block -> r + 1, the next block <-
r - 1], the same on every rank, so NCCL's grouped point-to-point cannot wait in a circle. What
the forward keeps for the backward is O(N_r + M_r): the row and column log-sum-exps.

Backward (``circulate_gradients``): the key blocks re-circulate (with their column weights and
column log-sum-exps), posted before each compute as in the forward. The fp32 (float64 for
float64) accumulator of d(block s) arrives before the step that computes on block s, this
rank's share is added into it in place, key chunk by key chunk (KEY_CHUNKS kernel calls per
block, so the partial gradient is a quarter block), and it is handed to r + 1 after the compute
(it depends on it). After W steps each accumulator holds every rank's share and is one hop from
home; the last hand-over takes it there. Peak per rank: its own block, the block it computes on,
the arriving block and one accumulator (two during the hand-over, when the computed block is
already released), plus a quarter-block partial. A symmetric loss is one ring forward and one
ring backward.

Peers are the ranks r +- 1 of the group, turned into global ranks (Comm.global_rank).
Blocks may differ in size across ranks (every rank knows every rank's sizes from the metadata
exchange); an empty batch is refused on every rank by the public functions' checks.
"""
import torch
import torch.distributed as dist

from .._host import accumulate_dtype
from .blocks import (lse_block_backward, lse_block_forward, siglip_block_backward,
                     siglip_block_forward)

__all__ = ["circulate", "circulate_gradients", "key_chunks", "lse_forward", "lse_backward",
           "siglip_forward", "siglip_backward", "KEY_CHUNKS"]

KEY_CHUNKS = 4  # kernel calls per block in the backward: the partial d(block) is M_s / 4 rows


def _ops(kind, tensors, peer, group):
    return [dist.P2POp(kind, t, peer, group) for t in tensors]


def _post(ops):
    return dist.batch_isend_irecv(ops) if ops else []


def _wait(reqs):
    """Waits for the requests and empties the list: a finished request still references its
    tensors, and a released block must not outlive its step."""
    for req in reqs:
        req.wait()
    reqs.clear()


def _peers(comm):
    return comm.global_rank(comm.rank + 1), comm.global_rank(comm.rank - 1)


def circulate(comm, payload, payload_like, acc_like, compute, merge):
    """Pass every rank's ``payload`` (a list of tensors) around the ring (the forward).

    payload_like(s) / acc_like(s): empty tensors shaped as rank s's payload / accumulators
    (small: O(M_s) statistics); compute(s, block) -> the partial accumulators (a list) of rank
    s's block from this rank; merge(accumulated, partial) -> the merged accumulator. Returns
    this rank's own accumulators with every rank's share merged in (empty list when none)."""
    world, rank, group = comm.world, comm.rank, comm.group
    nxt, prv = _peers(comm)
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
        reqs = _post(ops)
        partial = compute(source, block)  # overlaps the transfers posted above
        _wait(reqs)
        ops.clear()
        pending = partial if arriving is None else [merge(a, p) for a, p in zip(arriving, partial)]
        block = incoming
    if world == 1 or not pending:
        return pending or []
    home = acc_like(rank)
    _wait(_post(_ops(dist.isend, pending, nxt, group) + _ops(dist.irecv, home, prv, group)))
    return home


def circulate_gradients(comm, payload, payload_like, grad_like, accumulate):
    """Pass every rank's ``payload`` around the ring again with a gradient accumulator per
    block (the backward): accumulate(s, block, acc) adds this rank's share of d(block s) into
    ``acc`` (grad_like(s): an empty tensor shaped as it) in place. Returns this rank's own
    accumulator holding the sum of every rank's share."""
    world, rank, group = comm.world, comm.rank, comm.group
    nxt, prv = _peers(comm)
    block = [t.contiguous() for t in payload]
    acc = grad_like(rank).zero_()
    for t in range(world):
        source = (rank - t) % world
        reqs, incoming = [], None
        if t < world - 1:
            incoming = payload_like((source - 1) % world)
            reqs = _post(_ops(dist.isend, block, nxt, group)
                         + _ops(dist.irecv, incoming, prv, group))
        accumulate(source, block, acc)  # overlaps the block transfers posted above
        _wait(reqs)
        block = incoming  # the computed block is released before the hand-over
        if world == 1:
            break
        # acc of block s -> r + 1; that of block s - 1 (at the last step: this rank's own,
        # complete) <- r - 1, which has just added its share.
        arriving = grad_like((source - 1) % world)
        _wait(_post(_ops(dist.isend, [acc], nxt, group)
                    + _ops(dist.irecv, [arriving], prv, group)))
        acc = arriving
    return acc


def key_chunks(m):
    """(j0, j1) ranges of the KEY_CHUNKS key chunks of an m-row block."""
    size = max(1, -(-m // KEY_CHUNKS))
    return [(j0, min(j0 + size, m)) for j0 in range(0, m, size)]


def _offsets(sizes):
    out, total = [], 0
    for size in sizes:
        out.append(total)
        total += size
    return out


def _chunk(t, j0, j1):
    return None if t is None else t[j0:j1]


def _filter_payload(row_filter):
    """What travels with this rank's key block for the false-negative filter (its guide keys
    and, for a symmetric loss, its column thresholds: RowFilter.payload)."""
    return [] if row_filter is None else row_filter.payload()


def _filter_like(row_filter, m):
    return [t.new_empty((m,) + t.shape[1:]) for t in _filter_payload(row_filter)]


def _block_filter(row_filter, lo, payload, j0, j1):
    """The kernel keywords of ``row_filter`` for keys j0 .. j1 of the block of global index lo
    whose filter payload is ``payload`` (None without a filter)."""
    return None if row_filter is None else row_filter.block(lo + j0, j1 - j0, payload, j0)


def lse_forward(comm, layout, spec, x, scale, y, targets, ids, row_filter=None):
    """(row_lse (N,), col_lse of this rank's keys (M_r,) or None, positive (N,) or None,
    saved tensors for lse_backward). ``ids``: (row_ids (N,), col_ids of this rank's keys
    (M_r,)) of the id mask, or None; the column ids (and the false-negative filter's guide
    keys and, symmetric, column thresholds) travel with their block."""
    acc = accumulate_dtype(x.dtype)
    key_off = _offsets(layout.keys)
    row_lse = torch.full((x.shape[0],), float("-inf"), dtype=acc, device=x.device)
    positive = None if targets is None else torch.zeros(x.shape[0], dtype=acc, device=x.device)
    row_ids = None if ids is None else ids[0]

    def compute(s, block):
        nonlocal row_lse
        diag = 0 if (spec.exclude_self and s == comm.rank) else None
        col_ids = block[1] if ids is not None else None
        lse_filter = _block_filter(row_filter, key_off[s], block[1 + (ids is not None):], 0,
                                   block[0].shape[0])
        part, col = lse_block_forward(x, scale, block[0], key_off[s], diag, spec.with_col,
                                      targets, positive, spec.backend, row_ids, col_ids,
                                      lse_filter=lse_filter)
        row_lse = torch.logaddexp(row_lse, part)
        return [col] if spec.with_col else []

    d = y.shape[1]

    def payload_like(s):
        m = layout.keys[s]
        ids_like = [torch.empty(m, dtype=torch.int64, device=x.device)] if ids is not None else []
        return [y.new_empty(m, d)] + ids_like + _filter_like(row_filter, m)

    col = circulate(comm, [y] + ([ids[1]] if ids is not None else []) + _filter_payload(row_filter),
                    payload_like,
                    lambda s: ([torch.empty(layout.keys[s], dtype=acc, device=x.device)]
                               if spec.with_col else []),
                    compute, torch.logaddexp)
    col_lse = col[0] if spec.with_col else None
    return row_lse, col_lse, positive, (col_lse,)


def lse_backward(comm, layout, spec, x, scale, y, targets, ids, row_lse, saved, g, c, g_pos,
                 row_filter=None):
    """(dx (N, D), dy (M_r, D)) in the accumulation dtype: the gradient of the sum of all ranks'
    losses; the key gradients travel home with their block."""
    acc = accumulate_dtype(x.dtype)
    key_off = _offsets(layout.keys)
    (col_lse,) = saved
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    d = y.shape[1]
    with_col, with_ids = spec.with_col, ids is not None
    payload = [y] + ([c.to(acc).contiguous(), col_lse] if with_col else []) + (
        [ids[1]] if with_ids else []) + _filter_payload(row_filter)
    ids_at = 3 if with_col else 1  # the column ids' place in the payload
    row_ids = ids[0] if with_ids else None

    def payload_like(s):
        m = layout.keys[s]
        out = [y.new_empty(m, d)]
        if with_col:
            out += [torch.empty(m, dtype=acc, device=x.device) for _ in range(2)]
        if with_ids:
            out.append(torch.empty(m, dtype=torch.int64, device=x.device))
        return out + _filter_like(row_filter, m)

    def accumulate(s, block, dy):
        keys = block[0]
        c_s, col_s = (block[1], block[2]) if with_col else (None, None)
        col_ids = block[ids_at] if with_ids else None
        own = spec.exclude_self and s == comm.rank
        for j0, j1 in key_chunks(keys.shape[0]):
            dx_part, dy_part = lse_block_backward(
                x, scale, keys[j0:j1], key_off[s] + j0, -j0 if own else None, row_lse, g,
                _chunk(col_s, j0, j1), _chunk(c_s, j0, j1), targets, g_pos, True, spec.backend,
                row_ids, _chunk(col_ids, j0, j1),
                lse_filter=_block_filter(row_filter, key_off[s], block[ids_at + with_ids:], j0,
                                         j1))
            dx.add_(dx_part)
            dy[j0:j1].add_(dy_part)
            del dx_part, dy_part  # before the next chunk's

    dy = circulate_gradients(comm, payload, payload_like,
                             lambda s: torch.empty(layout.keys[s], d, dtype=acc,
                                                   device=x.device), accumulate)
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

    def accumulate(s, block, gy):
        texts = block[0]
        for j0, j1 in key_chunks(texts.shape[0]):
            gx_part, gy_part, dscale, dbias = siglip_block_backward(
                x, texts[j0:j1], scale, bias, off[s] + j0, off[comm.rank], g, True, backend)
            gx.add_(gx_part)
            gy[j0:j1].add_(gy_part)
            sums[0] += dscale
            sums[1] += dbias
            del gx_part, gy_part  # before the next chunk's

    gy = circulate_gradients(comm, [y], lambda s: [y.new_empty(layout.keys[s], y.shape[1])],
                             lambda s: torch.empty(layout.keys[s], y.shape[1], dtype=acc,
                                                   device=x.device), accumulate)
    return gx, gy, sums[0], sums[1]
