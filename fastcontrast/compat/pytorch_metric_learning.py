"""Drop-in classes for pytorch-metric-learning 2.9's ``NTXentLoss`` and ``SupConLoss``
(``pytorch_metric_learning.losses``), on fastcontrast's fused losses: pml's constructor
(``temperature`` and the ``distance`` / ``reducer`` / ``embedding_regularizer`` /
``embedding_reg_weight`` / ``collect_stats`` keywords) and forward
``(embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None)``::

    from fastcontrast.compat.pytorch_metric_learning import NTXentLoss, SupConLoss

Pairs, as pml builds them from labels: every (anchor i, reference j) with the same label is a
positive pair, except i == j when the reference set is the batch itself (ref_emb None); every
pair with different labels is a negative pair. s_ij = <e^_i, r^_j> / temperature (cosine
similarity, pml's default distance).

    NTXentLoss  one loss per positive pair (i, p), over p and the negatives of i only:
                loss_ip = -log(e^{s_ip} / (e^{s_ip} + sum_{n: label_n != label_i} e^{s_in}))
                reduced by MeanReducer: the mean over the positive pairs
    SupConLoss  one loss per anchor over its positives P_i and its candidates C_i (every
                reference; i itself excluded when the reference set is the batch):
                loss_i = -(1/|P_i|) sum_{p in P_i} (s_ip - logsumexp_{j in C_i} s_ij)
                (0 for an anchor without positive), reduced by AvgNonZeroReducer: the mean of
                the losses > 0

As pml, a batch without a positive pair or without a negative pair (a single class, every class
a singleton) gives a zero loss that still depends on the embeddings (zero gradients), as does a
batch with at most one positive and one negative pair.

Computation: the log-sum-exp of each anchor over its candidates is one fused
fastcontrast.info_nce call over the reference set (the references with the anchor's label
masked by their ids for NTXentLoss), SupConLoss on the batch itself is fastcontrast.supcon;
neither forms the N x M similarities. pml forms the N x M matrix and, for NTXentLoss, a
(positive pairs) x (negative pairs) mask.

Supported options: ``reducer`` MeanReducer, SumReducer, ThresholdReducer / AvgNonZeroReducer
(pml's own reducers, applied to the same per-pair / per-anchor losses); ``distance``
CosineSimilarity with its defaults; ``ref_emb`` with ``ref_labels``. Refused with
NotImplementedError naming the option: ``indices_tuple`` (mined pairs / triplets), any other
distance or reducer, ``embedding_regularizer``, ``collect_stats=True``, ``ref_emb`` without
``ref_labels``, and ``ref_labels`` that is ``labels`` itself with a separate ``ref_emb``.
The ``temperature`` must be > 0 (pml does not check it). The ``distance`` and ``reducer``
attributes hold what was passed (None for the defaults, where pml holds its default objects);
the classes record no statistics.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .._validation import check_positive_number
from ..functional import info_nce, supcon

__all__ = ["NTXentLoss", "SupConLoss", "PATCH_TARGETS"]

_OPTIONS = ("distance", "reducer", "embedding_regularizer", "embedding_reg_weight",
            "collect_stats")


def _pml_type(obj, package, *names):
    """Whether obj is exactly one of pml's classes ``names`` (not a subclass: it may override)."""
    cls = type(obj)
    return cls.__name__ in names and cls.__module__.startswith(f"pytorch_metric_learning.{package}")


def _check_distance(distance):
    if distance is None:
        return
    if not (_pml_type(distance, "distances", "CosineSimilarity") and distance.p == 2
            and distance.power == 1 and distance.normalize_embeddings and distance.is_inverted):
        raise NotImplementedError(f"distance={distance!r}: fastcontrast computes the default "
                                  "distance only, CosineSimilarity() (pass distance=None)")


def _reduction_of(reducer, default):
    """pml reducer -> ("mean" | "sum" | (low, high) thresholds); None: the class's default."""
    if reducer is None:
        return default
    if getattr(reducer, "collect_stats", False):
        raise NotImplementedError(f"reducer={reducer!r} with collect_stats=True: fastcontrast "
                                  "records no statistics")
    if _pml_type(reducer, "reducers", "MeanReducer"):
        return "mean"
    if _pml_type(reducer, "reducers", "SumReducer"):
        return "sum"
    if _pml_type(reducer, "reducers", "ThresholdReducer", "AvgNonZeroReducer"):
        return (reducer.low, reducer.high)
    raise NotImplementedError(f"reducer={reducer!r}: fastcontrast supports MeanReducer, "
                              "SumReducer, ThresholdReducer and AvgNonZeroReducer")


def _reduce(losses, reduction, embeddings):
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    low, high = reduction
    keep = torch.ones_like(losses, dtype=torch.bool)
    if low is not None:
        keep &= losses > low
    if high is not None:
        keep &= losses < high
    return losses[keep].mean() if bool(keep.any()) else _zero(embeddings)


def _zero(embeddings):
    """pml's zero loss: 0, in the graph of the embeddings (their gradient is zero)."""
    return (embeddings * 0).sum()


def _check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels):
    """pml's forward checks, with fastcontrast's refusals; returns labels on the device."""
    if indices_tuple is not None:
        raise NotImplementedError("indices_tuple (mined pairs or triplets): fastcontrast "
                                  "computes the loss over every pair the labels define only")
    if labels is None:
        raise ValueError("labels and indices_tuple cannot both be None")
    for name, t in (("embeddings", embeddings), ("ref_emb", ref_emb)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating (batch_size, embedding_size) tensor, "
                             f"got shape {tuple(t.shape)}, dtype {t.dtype}")
    for name, t, rows in (("labels", labels, embeddings), ("ref_labels", ref_labels, ref_emb)):
        if t is None or rows is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise ValueError(f"{name} must be a 1D tensor of shape (batch_size,), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if t.shape[0] != rows.shape[0]:
            raise ValueError(f"{name} must have one entry per embedding ({rows.shape[0]}), got "
                             f"{t.shape[0]}")
    if ref_emb is not None:
        if ref_labels is None:
            raise NotImplementedError("ref_emb without ref_labels: pass the labels of the "
                                      "reference embeddings")
        if ref_labels is labels:
            raise NotImplementedError("ref_labels is labels (the same tensor) with a separate "
                                      "ref_emb: pass a copy of the labels, or ref_emb=None")
        if ref_emb.shape[1] != embeddings.shape[1] or ref_emb.dtype != embeddings.dtype \
                or ref_emb.device != embeddings.device:
            raise ValueError(f"ref_emb must match embeddings in embedding_size, dtype and "
                             f"device, got {tuple(ref_emb.shape)} {ref_emb.dtype} "
                             f"{ref_emb.device} vs {tuple(embeddings.shape)} {embeddings.dtype} "
                             f"{embeddings.device}")
    return labels.to(embeddings.device)


class _PairLoss(nn.Module):
    """pml's constructor and forward around ``_losses`` (the per-pair or per-anchor losses)."""

    default_reduction = "mean"

    def __init__(self, temperature, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword arguments {unknown}")
        check_positive_number("temperature", temperature)
        if kwargs.get("embedding_regularizer") is not None:
            raise NotImplementedError(f"embedding_regularizer="
                                      f"{kwargs['embedding_regularizer']!r}: fastcontrast adds "
                                      "no regularisation term")
        if kwargs.get("collect_stats"):
            raise NotImplementedError("collect_stats=True: fastcontrast records no statistics")
        _check_distance(kwargs.get("distance"))
        self._reduction = _reduction_of(kwargs.get("reducer"), self.default_reduction)
        self.temperature = temperature
        self.distance = kwargs.get("distance")
        self.reducer = kwargs.get("reducer")
        self.embedding_regularizer = None
        self.embedding_reg_weight = kwargs.get("embedding_reg_weight", 1)
        self.collect_stats = False

    def forward(self, embeddings, labels=None, indices_tuple=None, ref_emb=None,
                ref_labels=None):
        labels = _check_inputs(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        same_set = ref_emb is None
        if same_set:
            ref_emb, ref_labels = embeddings, labels
        else:
            ref_labels = ref_labels.to(ref_emb.device)
        # Dense non-negative class codes: pml compares labels with ==, the id masks want ints.
        _, codes = torch.unique(torch.cat([labels, ref_labels]), return_inverse=True)
        codes, ref_codes = codes[:labels.shape[0]], codes[labels.shape[0]:]
        # references with the anchor's label (the anchor itself among them when same_set)
        same = torch.bincount(ref_codes, minlength=int(codes.max()) + 1)[codes]
        n_pos = int(same.sum()) - (embeddings.shape[0] if same_set else 0)
        n_neg = embeddings.shape[0] * ref_emb.shape[0] - int(same.sum())
        # pml returns its zero loss without a positive or a negative pair, or with <= 1 of each.
        if n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1):
            return _zero(embeddings)
        losses = self._losses(embeddings, codes, ref_emb, ref_codes, same_set, same)
        return _reduce(losses, self._reduction, embeddings)

    def _logsumexp(self, embeddings, ref_emb, codes=None, ref_codes=None):
        """(N,): logsumexp_j s_ij over the references (those whose code differs from the
        anchor's when codes are given), one fused call: DCL's loss with the anchor itself as the
        key is lse_i - s_ii, the key out of the denominator."""
        loss = info_nce(embeddings, embeddings, ref_emb, temperature=self.temperature,
                        in_batch_negatives=False, decoupled=True, query_ids=codes,
                        negative_ids=ref_codes, reduction="none")
        unit = F.normalize(embeddings, dim=1)
        return loss + (unit * unit).sum(1) / self.temperature


class NTXentLoss(_PairLoss):
    """pytorch_metric_learning.losses.NTXentLoss(temperature=0.07, **kwargs): one loss per
    positive pair against the anchor's negatives, MeanReducer (see the module docstring).

    loss_ip = log(1 + exp(lse_i - s_ip)), lse_i = logsumexp_{n: label_n != label_i} s_in fused
    per anchor (-inf without a negative: loss 0), s_ip for the P positive pairs (O(P D))."""

    def __init__(self, temperature=0.07, **kwargs):
        super().__init__(temperature, **kwargs)

    def _losses(self, embeddings, codes, ref_emb, ref_codes, same_set, same):
        matches = codes[:, None] == ref_codes[None, :]
        if same_set:
            matches.fill_diagonal_(False)
        anchors, positives = torch.nonzero(matches, as_tuple=True)
        lse = self._logsumexp(embeddings, ref_emb, codes, ref_codes)
        lse = torch.where(same < ref_emb.shape[0], lse, -torch.inf)  # rows without a negative
        unit, ref_unit = F.normalize(embeddings, dim=1), F.normalize(ref_emb, dim=1)
        positive = (unit[anchors] * ref_unit[positives]).sum(1) / self.temperature
        margin = lse[anchors] - positive
        return torch.logaddexp(torch.zeros_like(margin), margin)  # softplus, no threshold


class SupConLoss(_PairLoss):
    """pytorch_metric_learning.losses.SupConLoss(temperature=0.1, **kwargs): one loss per anchor,
    the mean over its positives, AvgNonZeroReducer (see the module docstring).

    On the batch itself: fastcontrast.supcon. Against a reference set every reference is a
    candidate: loss_i = lse_i - <e^_i, sum_{p in P_i} r^_p> / (|P_i| temperature), the fused
    lse_i over all references and the class sums of the normalised references (O((N + M) D))."""

    default_reduction = (0, None)  # AvgNonZeroReducer: ThresholdReducer(low=0)

    def __init__(self, temperature=0.1, **kwargs):
        super().__init__(temperature, **kwargs)

    def _losses(self, embeddings, codes, ref_emb, ref_codes, same_set, same):
        if same_set:
            return supcon(embeddings, codes, temperature=self.temperature, reduction="none")
        ref_unit = F.normalize(ref_emb, dim=1)
        classes = int(torch.maximum(codes.max(), ref_codes.max())) + 1
        class_sums = ref_unit.new_zeros(classes, ref_unit.shape[1])
        class_sums = class_sums.index_add(0, ref_codes, ref_unit)[codes]
        positive = (F.normalize(embeddings, dim=1) * class_sums).sum(1)
        count = same.clamp(min=1).to(positive.dtype)  # >= 1: no 0/0 in the masked rows' grad
        loss = self._logsumexp(embeddings, ref_emb) - positive / (self.temperature * count)
        return torch.where(same > 0, loss, torch.zeros_like(loss))


#: the peer's classes replaced by fastcontrast.compat.patch("pytorch_metric_learning")
PATCH_TARGETS = {
    "pytorch_metric_learning.losses.ntxent_loss": {"NTXentLoss": NTXentLoss},
    "pytorch_metric_learning.losses.supcon_loss": {"SupConLoss": SupConLoss},
}
