"""False-negative filtering over the candidates of every rank (the rules of
fastcontrast/infonce/false_negatives.py on the concatenated batch): candidate j != t_i of row i
is dropped from its denominator iff

    margin m:  s_ij > thr_i = s_{i,t_i} + scale m          (s = scale <q^_i, y^_j>)
    guide:     <gq^_i, gy^_j> > gthr_i = g_{i,t_i} - margin  (or - |g_{i,t_i}| margin)

decided inside the tiles of every block of keys (gather: all of them; ring: each travelling
block), never on a stored score matrix. The thresholds are per row and computed up front from
the positive's key (and guide key) rows, which may live on another rank when targets index the
global keys: ``fetch_rows`` brings those N_r rows (gather: from the all-gathered keys; ring: one
circulation of the key blocks, no rank holding more than its ring buffers). The guide keys
travel with their key block (gather.py / ring.py) and get no gradient; the positive's column of
each block (-1: elsewhere) keeps it from ever being dropped. ``dropped_counts``: the candidates
of every rank dropped for this rank's rows, one pass over the blocks without exps.

A symmetric loss (CLIP: N_r == M_r, no targets, no bank) filters both directions in the same
pass, as single-process: column j of the global keys (key -> query direction) has its positive
at global row j and, the scores and guide similarities being symmetric in the pair, the
thresholds of row j, so entry (i, j) leaves column j's log-sum-exp iff

    s_ij > thr_j   or   <gq^_i, gy^_j> > gthr_j        (i != j)

(the kernels' column rule). Each rank's column thresholds are its rows' and travel with its key
block beside the guide keys (``RowFilter.payload``: gathered / circulated); the dropped counts
of the columns are summed over the ranks (gather: an all-reduce of M_total ints; ring: with the
block, as the column log-sum-exps).
"""
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .._host import accumulate_dtype, rowwise_dot
from ..infonce.false_negatives import guide_thresholds, unit_guide
from ..infonce.ops import masked_lse_dropped
from . import ring
from .calls import exchange, float_code
from .collectives import all_gather_rows

__all__ = ["RowFilter", "row_filter", "fetch_rows", "dropped_counts", "filter_code",
           "check_margins"]


def filter_code(fn, return_dropped):
    """The metadata exchange's row of FalseNegatives ``fn`` (or None): which rules, the guide
    dimension G, return_dropped (the ranks must agree; the margins: ``check_margins``)."""
    if fn is None:
        return [("the false-negative filter (given / false_negative_margin given / guide given "
                 "/ guide_margin_strategy / return_dropped / guide dimension G)", 0)]
    flags = (1 | int(fn.margin is not None) << 1 | int(fn.has_guide) << 2
             | int(fn.guide_strategy == "relative") << 3 | int(return_dropped) << 4
             | (fn.guide_query.shape[1] if fn.has_guide else 0) << 5)
    return [("the false-negative filter (given / false_negative_margin given / guide given / "
             "guide_margin_strategy / return_dropped / guide dimension G)", flags)]


def check_margins(comm, device, fn):
    """After an exchange that agreed on a filter: every rank has the same margins (else a
    ValueError naming them on every rank)."""
    exchange(comm, device, [("false_negative_margin", float_code(fn.margin)),
                            ("guide_margin", float_code(fn.guide_margin))])


class RowFilter(NamedTuple):
    """The filter of this rank's rows: thresholds (N_r,) in the accumulation dtype or None, the
    unit guide rows of the queries (N_r, G) and their thresholds or None, this rank's share of
    the guide keys (the guide rows of its product keys, unit, detached) or None, and the product
    index of each row's positive (None: the positive is not a key of the product). A symmetric
    loss adds the column rule of its keys: ``col_threshold`` / ``col_guide_threshold`` (M_r,),
    those of this rank's keys (column j's positive is row j: its thresholds are row j's), and
    ``rows`` = (global index of this rank's first row, N_r), to find each column's positive
    row among this rank's rows (None: one direction)."""

    threshold: Optional[Tensor]
    guide_q: Optional[Tensor]
    guide_threshold: Optional[Tensor]
    guide_keys: Optional[Tensor]
    targets: Optional[Tensor]
    col_threshold: Optional[Tensor] = None
    col_guide_threshold: Optional[Tensor] = None
    rows: Optional[tuple] = None

    def payload(self):
        """The tensors (M_r rows each) that travel with this rank's product keys (gathered or
        around the ring): the guide keys, then the column thresholds, those present."""
        return [t for t in (self.guide_keys, self.col_threshold, self.col_guide_threshold)
                if t is not None]

    def block(self, lo, m, payload, j0=0):
        """The kernel ops' filter keywords for the m keys of global product index lo .. lo + m,
        keys j0 .. j0 + m of a block whose payload (``payload()`` of its rank) is ``payload``."""
        positive_col = None if self.targets is None else _inside(self.targets - lo, m)
        parts = iter([t[j0:j0 + m].contiguous() for t in payload])
        guide_block = next(parts) if self.guide_keys is not None else None
        has_guide = self.guide_q is not None and guide_block is not None
        given = dict(threshold=self.threshold, positive_col=positive_col,
                     guide_q=self.guide_q if has_guide else None,
                     guide_keys=guide_block if has_guide else None,
                     guide_threshold=self.guide_threshold if has_guide else None)
        if self.rows is None:
            return given
        col_threshold = next(parts) if self.col_threshold is not None else None
        col_guide = next(parts) if self.col_guide_threshold is not None else None
        first, n = self.rows  # column lo + j's positive: global row lo + j, if it is ours
        device = next(t for t in (self.threshold, self.guide_q) if t is not None).device
        return dict(given, col_threshold=col_threshold, col_guide_threshold=col_guide,
                    col_positive_row=_inside(torch.arange(lo - first, lo - first + m,
                                                          device=device), n))


def _inside(local, n):
    """``local`` where it is an index 0 .. n - 1, else -1 (the kernels' "elsewhere")."""
    return torch.where((local >= 0) & (local < n), local, torch.full_like(local, -1)).contiguous()


def _offsets(sizes):
    return [sum(sizes[:s]) for s in range(len(sizes))]


@torch.no_grad()
def fetch_rows(comm, mode, tensors, sizes, index):
    """[t_all[index] for t in tensors]: the rows of global index ``index`` (N_r,) of tensors
    split over the ranks (this rank holds ``sizes[rank]`` rows of each), detached."""
    tensors = [t.detach().contiguous() for t in tensors]
    if mode == "gather":
        return [all_gather_rows(comm, t, sizes)[index] for t in tensors]
    out = [t.new_empty((index.shape[0],) + t.shape[1:]) for t in tensors]
    offsets = _offsets(sizes)

    def compute(s, block):
        hit = ((index >= offsets[s]) & (index < offsets[s] + sizes[s])).nonzero().squeeze(1)
        for o, b in zip(out, block):
            o[hit] = b[index[hit] - offsets[s]]
        return []

    ring.circulate(comm, tensors, lambda s: [t.new_empty((sizes[s],) + t.shape[1:])
                                             for t in tensors], lambda s: [], compute, torch.add)
    return out


def row_filter(comm, mode, fn, q, k, scale, *, n_keys, global_targets, product_targets,
               guide_product, first_row=None):
    """The RowFilter of FalseNegatives ``fn`` for this rank's prepared rows q against the
    prepared keys k of every rank (``n_keys``: every rank's key count; ``global_targets``: the
    global key index of each row's positive, None: key i of this rank). ``product_targets``:
    the positives' product index (None: not in the product); ``guide_product``: whether the
    guide keys of the product are [guide_key; guide_bank] (in-batch negatives) or the guide
    bank alone. ``first_row``: the global index of this rank's first row, for a symmetric loss
    (CLIP: N_r == M_r, no bank, no targets; validated), whose filter then carries the column
    rule; None: one direction."""
    acc = accumulate_dtype(q.dtype)
    guides = [fn.guide_key] if fn.has_guide else []
    if global_targets is None:
        positive_key, *positive_guide = [k[:q.shape[0]]] + [g[:q.shape[0]] for g in guides]
    else:
        positive_key, *positive_guide = fetch_rows(comm, mode, [k] + guides, n_keys,
                                                   global_targets)
    threshold = None
    if fn.margin is not None:  # the single-process bits: scale * <q, k_t> + scale m
        positive = scale.to(acc) * rowwise_dot(q.detach(), positive_key).to(acc)
        threshold = (positive + scale.to(acc) * fn.margin).contiguous()
    guide_q = guide_threshold = guide_keys = None
    if fn.has_guide:
        guide_q = unit_guide(fn.guide_query, q.dtype)
        guide_threshold = guide_thresholds(fn, guide_q, unit_guide(positive_guide[0], q.dtype),
                                           acc).contiguous()
        parts = [fn.guide_key] if guide_product else []
        if fn.guide_bank is not None:
            parts.append(fn.guide_bank)
        guide_keys = unit_guide(torch.cat(parts), q.dtype).contiguous() if parts else None
    if first_row is None:
        return RowFilter(threshold, guide_q, guide_threshold, guide_keys, product_targets)
    # Column j's positive is row j: the key -> query direction's thresholds of this rank's keys
    # are its rows' (the scores and guide similarities are symmetric in the pair).
    return RowFilter(threshold, guide_q, guide_threshold, guide_keys, product_targets,
                     col_threshold=threshold, col_guide_threshold=guide_threshold,
                     rows=(first_row, q.shape[0]))


@torch.no_grad()
def dropped_counts(cand, row_filter):
    """int64 (N_r,): the candidates of every rank's product keys that the filter drops for
    this rank's rows (id-masked entries are no candidates and not counted); with the column
    rule (2, N_r): then the rows of every rank dropped for this rank's keys (its columns),
    each rank's share summed (gather: one all-reduce of M floats; ring: with the block)."""
    comm, layout, spec, x = cand.comm, cand.layout, cand.spec, cand.q
    counts = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    symmetric = row_filter.rows is not None
    if cand.y is None or sum(layout.keys) == 0:
        return torch.stack([counts, counts]) if symmetric else counts
    acc = accumulate_dtype(x.dtype)
    alpha = cand.base_scale.to(acc).expand(x.shape[0]).contiguous()
    row_ids, col_ids = cand.ids if cand.ids is not None else (None, None)
    ids = [col_ids] if col_ids is not None else []
    payload = [cand.y.contiguous()] + ids + row_filter.payload()
    offsets = _offsets(layout.keys)

    def compute(s, block):
        keys = block[0]
        beta = torch.ones(keys.shape[0], dtype=acc, device=x.device)
        both = masked_lse_dropped(
            x, keys, alpha, beta, row_ids, block[1] if ids else None, False, 0, spec.backend,
            **row_filter.block(offsets[s], keys.shape[0], block[1 + len(ids):]))
        counts.add_(both[:x.shape[0]])
        return [both[x.shape[0]:]] if symmetric else []

    if spec.mode == "gather":  # one block of every rank's keys, at global index 0
        columns = compute(0, [all_gather_rows(comm, t.contiguous(), layout.keys)
                              for t in payload])
        if not symmetric:
            return counts
        if comm.world > 1:
            dist.all_reduce(columns[0], group=comm.group)
        first = layout.key_offset(comm.rank)
        return torch.stack([counts, columns[0][first:first + x.shape[0]]])
    columns = ring.circulate(
        comm, payload, lambda s: [t.new_empty((layout.keys[s],) + t.shape[1:]) for t in payload],
        lambda s: [counts.new_empty(layout.keys[s])] if symmetric else [], compute, torch.add)
    return torch.stack([counts, columns[0]]) if symmetric else counts
