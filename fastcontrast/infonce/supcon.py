"""SupCon L_out (Khosla et al. 2020) on the fused log-sum-exp:

    loss_a = lse_{b != a} s_ab - (1/|P(a)|) sum_{p in P(a)} s_ap

with sum_{p in P(a)} s_ap = <z^_a, S_{c(a)}> / tau - <z^_a, z^_a> / tau, S_c the sum of the
normalised features of class c (fastcontrast/_supcon_positives.py): no N x N mask, no pass over
the tiles for the positives. The denominator is one fused pass of the features against
themselves (the symmetric-Gram ops where they apply)."""
import torch

from .._host import class_index
from .._supcon_positives import normalized_rows, supcon_positive_means
from .function import fused_loss, non_negative, upcast_inputs
from .fused_pass import FusedPass

__all__ = ["supcon_loss"]


def supcon_loss(features, labels, scale, *, normalize, reduction, backend, eps=1e-12):
    """SupCon L_out over features (R, D) with labels (R,); per-anchor losses reduced as
    ``reduction`` (mean over anchors that have a positive), in the accumulation dtype; see the
    module docstring. scale = 1 / temperature."""
    # The denominator: lse over b != a (self excluded), without subtracting a positive. The
    # features are normalised once (normalized_rows) for it and for the positive term: one
    # (N, D) copy and one backward of the normalisation for both, where each did its own (on a
    # busy CPU every such pass is a parallel op that waits at a barrier for descheduled threads).
    denominator = FusedPass(backend=backend, in_batch_negatives=True, exclude_self=True,
                            symmetric=False, normalize=False,
                            reduction="none" if reduction == "none" else "sum",
                            exclude_positive=False, subtract_positive=False, eps=eps)
    # One float32 copy of low-precision features feeds the host terms and the fused pass.
    denominator, (features,) = upcast_inputs(denominator, features)
    if normalize:
        features = normalized_rows(features, eps, backend)
    cls = class_index(labels)
    n = features.shape[0]
    counts = torch.zeros(n, dtype=torch.int64, device=features.device).index_add(
        0, cls, torch.ones_like(cls))
    class_sizes = counts[cls]
    pos_mean = supcon_positive_means(features, scale.to(features.dtype), cls, class_sizes,
                                     backend=backend)
    has_positive = class_sizes > 1
    if reduction == "none":
        lse = fused_loss(denominator, features, features, scale=scale)
        loss = torch.where(has_positive, lse.to(features.dtype) - pos_mean,
                           torch.zeros_like(pos_mean))
        return _supcon_non_negative(loss, n)
    # A weighted sum keeps the fused kernels on their no-recompute path: w_a = 1 / #anchors with
    # a positive ("mean") or 1 ("sum") for those anchors, 0 for the others.
    weights = has_positive.to(features.dtype)
    if reduction == "mean":
        weights = weights / has_positive.sum().clamp_min(1)
    lse_sum = fused_loss(denominator, features, features, scale=scale, row_weights=weights)
    loss = lse_sum.to(features.dtype) - (weights * pos_mean).sum()
    return _supcon_non_negative(loss, n)


def _supcon_non_negative(loss, n):
    """SupCon's value is >= 0 (the lse over b != a bounds the mean over a's positives), and
    with two samples it is exactly s_ab - s_ab = 0: fix the value as function.non_negative
    does, leaving the gradient as it is (a detached correction)."""
    return loss + (non_negative(loss.detach(), n == 2) - loss.detach())
