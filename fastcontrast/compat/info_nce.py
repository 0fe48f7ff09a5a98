"""info-nce-pytorch 0.1.4's ``InfoNCE`` / ``info_nce`` on fastcontrast's fused InfoNCE.

    from fastcontrast.compat.info_nce import InfoNCE     # was: from info_nce import InfoNCE
    loss = InfoNCE(temperature=0.1, reduction="mean", negative_mode="unpaired")
    value = loss(query, positive_key, negative_keys=None)

Every vector is L2-normalised first (x / max(||x||, 1e-12), as torch.nn.functional.normalize),
then with s(a, b) = <a, b> / temperature:

    negative_keys=None          loss_i = logsumexp_j s(q_i, p_j) - s(q_i, p_i): the other
                                rows' positive keys are the negatives
    'unpaired', (M, D)          loss_i = logsumexp(s(q_i, p_i), s(q_i, n_1..n_M)) - s(q_i, p_i)
    'paired', (N, M, D)         the same with query i's own negatives n_i1..n_iM

With explicit negatives the other rows' positive keys are NOT negatives
(fastcontrast.info_nce with ``in_batch_negatives=False``; paired negatives are its per-query
negatives). ``reduction``: 'mean', 'sum' or 'none' ((N,)). The argument checks are the
peer's, raising ValueError where it does (with the argument, expected and actual value in the
message), and ``negative_mode`` is only read when negatives are given, as in the peer; where the
peer fails less clearly this raises a ValueError naming the argument: an unknown
``negative_mode`` (the peer: UnboundLocalError), mismatched dtypes or devices, a temperature
that is not a positive finite float or 0-dim tensor, an empty query. Zero negatives ((0, D) or
(N, 0, D)) give the peer's loss 0.
"""
from torch import nn

from .. import _validation as check
from .. import functional as fcf

__all__ = ["InfoNCE", "info_nce", "PATCH_TARGETS", "NEGATIVE_MODES"]

NEGATIVE_MODES = ("unpaired", "paired")


def _check(query, positive_key, negative_keys, negative_mode):
    """The peer's checks, in its order, under its argument names."""
    check.check_tensor("query", query, (2,))
    check.check_tensor("positive_key", positive_key, (2,))
    check.check_same("positive_key", positive_key, "query", query)
    if negative_keys is not None:
        check.check_choice("negative_mode", negative_mode, NEGATIVE_MODES)
        ndim = 2 if negative_mode == "unpaired" else 3
        shape = "(M, D)" if ndim == 2 else "(N, M, D)"
        if not hasattr(negative_keys, "dim") or negative_keys.dim() != ndim:
            got = (f"{negative_keys.dim()}-D, shape {tuple(negative_keys.shape)}"
                   if hasattr(negative_keys, "dim") else type(negative_keys).__name__)
            raise ValueError(f"negative_keys must be {ndim}-D {shape} with "
                             f"negative_mode={negative_mode!r}, got {got}")
        check.check_same("negative_keys", negative_keys, "query", query)
    n = query.shape[0]
    if positive_key.shape[0] != n:
        raise ValueError(f"positive_key must have as many rows as query (N = {n}, key i is the "
                         f"positive of query i), got shape {tuple(positive_key.shape)}")
    if negative_keys is not None and negative_mode == "paired" and negative_keys.shape[0] != n:
        raise ValueError(f"paired negative_keys must have N = {n} rows (one set per query), "
                         f"got shape {tuple(negative_keys.shape)}")
    check.check_feature_dim("positive_key", positive_key, query.shape[1])
    if negative_keys is not None:
        check.check_feature_dim("negative_keys", negative_keys, query.shape[1])


def info_nce(query, positive_key, negative_keys=None, temperature=0.1, reduction="mean",
             negative_mode="unpaired"):
    """InfoNCE of info-nce-pytorch (formulas in the module docstring), fused.

    query (N, D), positive_key (N, D); negative_keys None, (M, D) with
    negative_mode='unpaired' or (N, M, D) with 'paired'. temperature: positive float or 0-dim
    tensor (its gradient is exact). Returns the reduced loss ('none': (N,))."""
    _check(query, positive_key, negative_keys, negative_mode)
    if negative_keys is None:
        return fcf.info_nce(query, positive_key, temperature=temperature, reduction=reduction)
    if negative_keys.numel() == 0:
        # Only the positive is a candidate: loss_i = 0, as the peer's one-logit cross-entropy;
        # the (empty) negatives stay in the graph, so their gradient is an empty tensor too.
        loss = fcf.info_nce(query, positive_key, temperature=temperature, reduction=reduction,
                            in_batch_negatives=False)
        return loss + negative_keys.sum().to(loss.dtype) if negative_keys.requires_grad else loss
    return fcf.info_nce(query, positive_key, negative_keys, temperature=temperature,
                        reduction=reduction, in_batch_negatives=False)


class InfoNCE(nn.Module):
    """info-nce-pytorch's InfoNCE module: holds ``temperature`` (default 0.1), ``reduction``
    and ``negative_mode`` (read at each call) and calls :func:`info_nce`."""

    def __init__(self, temperature=0.1, reduction="mean", negative_mode="unpaired"):
        super().__init__()
        self.temperature = temperature
        self.reduction = reduction
        self.negative_mode = negative_mode

    def forward(self, query, positive_key, negative_keys=None):
        return info_nce(query, positive_key, negative_keys, temperature=self.temperature,
                        reduction=self.reduction, negative_mode=self.negative_mode)


PATCH_TARGETS = {"info_nce": {"InfoNCE": InfoNCE, "info_nce": info_nce}}
