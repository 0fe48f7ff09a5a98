"""The false-negative filter (fastcontrast/infonce/false_negatives.py) in the "torch" backend:
applied to each row chunk of scores right after its id mask, as the C++ kernels apply it to each
tile (csrc/cpu/false_negatives.h). Candidate (i, j) is dropped iff j != positive_col_i and
s_ij > threshold_i or <guide_q_i, guide_keys_j> > guide_threshold_i."""
import torch

__all__ = ["drop_filtered"]


def drop_filtered(s, r0, r1, *, threshold=None, positive_col=None, guide_q=None,
                  guide_keys=None, guide_threshold=None):
    """Sets the dropped entries of the (r1 - r0, M) score chunk ``s`` to -inf, in place; returns
    the number dropped per row (int64, id-masked entries are no candidates and not counted)."""
    drop = torch.zeros_like(s, dtype=torch.bool)
    if threshold is not None:
        drop |= s > threshold[r0:r1, None].to(s.dtype)
    if guide_q is not None:
        drop |= (guide_q[r0:r1] @ guide_keys.T) > guide_threshold[r0:r1, None]
    if positive_col is not None and s.shape[1]:  # -1 / outside s: the positive is elsewhere
        cols = positive_col[r0:r1]
        inside = (cols >= 0) & (cols < s.shape[1])
        rows = torch.arange(r1 - r0, device=s.device)
        drop[rows, cols.clamp(0, s.shape[1] - 1)] &= ~inside
    drop &= s != float("-inf")
    s.masked_fill_(drop, float("-inf"))
    return drop.sum(dim=1)
