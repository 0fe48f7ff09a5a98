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
"""
from typing import NamedTuple, Optional

import torch
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
    index of each row's positive (None: the positive is not a key of the product)."""

    threshold: Optional[Tensor]
    guide_q: Optional[Tensor]
    guide_threshold: Optional[Tensor]
    guide_keys: Optional[Tensor]
    targets: Optional[Tensor]

    def block(self, lo, m, guide_block):
        """The kernel ops' filter keywords for the m keys of global product index lo .. lo + m
        with their guide rows ``guide_block``."""
        positive_col = None
        if self.targets is not None:
            local = self.targets - lo
            positive_col = torch.where((local >= 0) & (local < m), local,
                                       torch.full_like(local, -1)).contiguous()
        has_guide = self.guide_q is not None and guide_block is not None
        return dict(threshold=self.threshold, positive_col=positive_col,
                    guide_q=self.guide_q if has_guide else None,
                    guide_keys=guide_block.contiguous() if has_guide else None,
                    guide_threshold=self.guide_threshold if has_guide else None)


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
               guide_product):
    """The RowFilter of FalseNegatives ``fn`` for this rank's prepared rows q against the
    prepared keys k of every rank (``n_keys``: every rank's key count; ``global_targets``: the
    global key index of each row's positive, None: key i of this rank). ``product_targets``:
    the positives' product index (None: not in the product); ``guide_product``: whether the
    guide keys of the product are [guide_key; guide_bank] (in-batch negatives) or the guide
    bank alone."""
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
    return RowFilter(threshold, guide_q, guide_threshold, guide_keys, product_targets)


@torch.no_grad()
def dropped_counts(cand, row_filter):
    """int64 (N_r,): the candidates of every rank's product keys that the filter drops for
    this rank's rows (id-masked entries are no candidates and not counted)."""
    comm, layout, spec, x = cand.comm, cand.layout, cand.spec, cand.q
    counts = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    if cand.y is None or sum(layout.keys) == 0:
        return counts
    acc = accumulate_dtype(x.dtype)
    alpha = cand.base_scale.to(acc).expand(x.shape[0]).contiguous()
    row_ids, col_ids = cand.ids if cand.ids is not None else (None, None)
    payload = [cand.y.contiguous()] + ([col_ids] if col_ids is not None else []) + (
        [row_filter.guide_keys] if row_filter.guide_keys is not None else [])
    offsets = _offsets(layout.keys)

    def compute(s, block):
        keys = block[0]
        guide = block[-1] if row_filter.guide_keys is not None else None
        beta = torch.ones(keys.shape[0], dtype=acc, device=x.device)
        counts.add_(masked_lse_dropped(
            x, keys, alpha, beta, row_ids, block[1] if col_ids is not None else None, False, 0,
            spec.backend, **row_filter.block(offsets[s], keys.shape[0], guide)))
        return []

    if spec.mode == "gather":  # one block of every rank's keys, at global index 0
        compute(0, [all_gather_rows(comm, t.contiguous(), layout.keys) for t in payload])
        return counts
    ring.circulate(comm, payload, lambda s: [t.new_empty((layout.keys[s],) + t.shape[1:])
                                             for t in payload], lambda s: [], compute, torch.add)
    return counts

