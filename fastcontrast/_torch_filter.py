"""The false-negative filter (fastcontrast/infonce/false_negatives.py) in the "torch" backend:
applied to each row chunk of scores right after its id mask, as the C++ kernels apply it to each
tile (csrc/cpu/false_negatives.h). Candidate (i, j) is dropped from row i iff j != positive_col_i
and s_ij > threshold_i or <guide_q_i, guide_keys_j> > guide_threshold_i; with the column rule
(col_positive_row given, the symmetric loss) it is dropped from column j iff
i != col_positive_row_j and s_ij > col_threshold_j or <guide_q_i, guide_keys_j> >
col_guide_threshold_j, the two decisions taken on the same chunk of scores."""
import torch

__all__ = ["drop_filtered", "split_filtered"]

_NEG_INF = float("-inf")


def _drops(s, threshold, positive, guide, guide_threshold):
    """bool like ``s``: the entries above the thresholds (broadcast along the dims they vary
    in), minus the positives (``positive``: (row index tensor, column index tensor) or None)."""
    drop = torch.zeros_like(s, dtype=torch.bool)
    if threshold is not None:
        drop |= s > threshold.to(s.dtype)
    if guide is not None:
        drop |= guide > guide_threshold
    if positive is not None:
        drop[positive] = False
    return drop & (s != _NEG_INF)  # id-masked entries are no candidates: not counted


def _row_positive(s, positive_col, r0, r1):
    """(rows, cols) of the positives of rows r0..r1 inside the chunk (-1 / outside: elsewhere)."""
    if positive_col is None or not s.shape[1]:
        return None
    cols = positive_col[r0:r1]
    inside = (cols >= 0) & (cols < s.shape[1])
    return torch.arange(r1 - r0, device=s.device)[inside], cols[inside]


def _col_positive(s, col_positive_row, r0, r1):
    """(rows, cols) of the column positives that are rows r0..r1 of the chunk."""
    rows = col_positive_row - r0
    inside = (rows >= 0) & (rows < r1 - r0)
    return rows[inside], torch.arange(s.shape[1], device=s.device)[inside]


def _row_drops(s, r0, r1, guide, *, threshold=None, positive_col=None, guide_threshold=None,
               **_):
    return _drops(s, None if threshold is None else threshold[r0:r1, None],
                  _row_positive(s, positive_col, r0, r1), guide,
                  None if guide is None else guide_threshold[r0:r1, None])


def _col_drops(s, r0, r1, guide, *, col_threshold=None, col_positive_row=None,
               col_guide_threshold=None, **_):
    return _drops(s, None if col_threshold is None else col_threshold[None, :],
                  _col_positive(s, col_positive_row, r0, r1), guide,
                  None if guide is None else col_guide_threshold[None, :])


def _guide_scores(r0, r1, guide_q=None, guide_keys=None, **_):
    return None if guide_q is None else guide_q[r0:r1] @ guide_keys.T


def drop_filtered(s, r0, r1, **lse_filter):
    """Sets the entries of the (r1 - r0, M) score chunk ``s`` that the row rule drops to -inf, in
    place; returns the number dropped per row (int64, id-masked entries are no candidates and
    not counted)."""
    drop = _row_drops(s, r0, r1, _guide_scores(r0, r1, **lse_filter), **lse_filter)
    s.masked_fill_(drop, _NEG_INF)
    return drop.sum(dim=1)


def split_filtered(s, r0, r1, **lse_filter):
    """(s_row, s_col, row counts, column counts) of the (r1 - r0, M) score chunk ``s``: s_row
    with the row rule's drops at -inf, s_col with the column rule's (the same tensor as s_row,
    column counts None, without a column rule). ``s`` itself becomes s_row."""
    if lse_filter.get("col_positive_row") is None:
        return s, s, drop_filtered(s, r0, r1, **lse_filter), None
    guide = _guide_scores(r0, r1, **lse_filter)
    col_drop = _col_drops(s, r0, r1, guide, **lse_filter)
    row_drop = _row_drops(s, r0, r1, guide, **lse_filter)
    s_col = s.masked_fill(col_drop, _NEG_INF)
    s.masked_fill_(row_drop, _NEG_INF)
    return s, s_col, row_drop.sum(dim=1), col_drop.sum(dim=0)
