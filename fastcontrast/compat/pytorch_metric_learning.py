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
                reference but i itself):
                loss_i = -(1/|P_i|) sum_{p in P_i} (s_ip - logsumexp_{j in C_i} s_ij)
                (0 for an anchor without positive), reduced by AvgNonZeroReducer: the mean of
                the losses > 0

As pml, a batch without a positive pair or without a negative pair (a single class, every class
a singleton) gives a zero loss that still depends on the embeddings (zero gradients), as does a
batch with at most one positive and one negative pair.

Computation: the positive pairs become the rows of one fused fastcontrast.info_nce call (query
e_i, key r_p, the reference set as shared negatives, the references with the anchor's label
masked out by their ids), or for SupConLoss on the batch itself fastcontrast.supcon. pml forms
the N x M matrix and, for NTXentLoss, a (positive pairs) x (negative pairs) mask.

Supported options: ``reducer`` MeanReducer, SumReducer, ThresholdReducer / AvgNonZeroReducer
(pml's own reducers, applied to the same per-pair / per-anchor losses); ``distance``
CosineSimilarity with its defaults; ``ref_emb`` with ``ref_labels``. Refused with
NotImplementedError naming the option: ``indices_tuple`` (mined pairs / triplets), any other
distance or reducer, ``embedding_regularizer``, ``collect_stats=True``, ``ref_emb`` without
``ref_labels``, and ``ref_labels`` that is ``labels`` itself with a separate ``ref_emb``.
The ``temperature`` must be > 0 (pml does not check it).
"""
import torch
from torch import nn

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
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
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
        matches = codes[:, None] == ref_codes[None, :]
        if same_set:
            matches.fill_diagonal_(False)
        anchors, positives = torch.nonzero(matches, as_tuple=True)
        n_pos = anchors.shape[0]
        n_neg = int((codes[:, None] != ref_codes[None, :]).sum())
        # pml returns its zero loss without a positive or a negative pair, or with <= 1 of each.
        if n_pos == 0 or n_neg == 0 or (n_pos <= 1 and n_neg <= 1):
            return _zero(embeddings)
        losses = self._losses(embeddings, codes, ref_emb, ref_codes, same_set, anchors,
                              positives)
        return _reduce(losses, self._reduction, embeddings)

    def _pair_info_nce(self, embeddings, ref_emb, anchors, positives, query_ids, negative_ids):
        """loss per positive pair (i, p): -log softmax of s_ip among p and the references whose
        id differs from the pair's query id (one fused call, the references as shared
        negatives)."""
        return info_nce(embeddings[anchors], ref_emb[positives], ref_emb,
                        temperature=self.temperature, in_batch_negatives=False,
                        query_ids=query_ids, negative_ids=negative_ids, reduction="none")


class NTXentLoss(_PairLoss):
    """pytorch_metric_learning.losses.NTXentLoss(temperature=0.07, **kwargs): one loss per
    positive pair against the anchor's negatives, MeanReducer (see the module docstring)."""

    def __init__(self, temperature=0.07, **kwargs):
        super().__init__(temperature, **kwargs)

    def _losses(self, embeddings, codes, ref_emb, ref_codes, same_set, anchors, positives):
        # The references sharing the anchor's label (the positive among them) are no negatives.
        return self._pair_info_nce(embeddings, ref_emb, anchors, positives, codes[anchors],
                                   ref_codes)


class SupConLoss(_PairLoss):
    """pytorch_metric_learning.losses.SupConLoss(temperature=0.1, **kwargs): one loss per anchor,
    the mean over its positives, AvgNonZeroReducer (see the module docstring)."""

    default_reduction = (0, None)  # AvgNonZeroReducer: ThresholdReducer(low=0)

    def __init__(self, temperature=0.1, **kwargs):
        super().__init__(temperature, **kwargs)

    def _losses(self, embeddings, codes, ref_emb, ref_codes, same_set, anchors, positives):
        if same_set:
            return supcon(embeddings, codes, temperature=self.temperature, reduction="none")
        # Against a reference set every reference is a candidate: the positive is the key and
        # its copy among the shared negatives is masked by its index.
        index = torch.arange(ref_emb.shape[0], device=ref_emb.device)
        pair = self._pair_info_nce(embeddings, ref_emb, anchors, positives, positives, index)
        n = embeddings.shape[0]
        total = pair.new_zeros(n).index_add(0, anchors, pair)
        count = torch.bincount(anchors, minlength=n).to(pair.dtype)
        return total / count.clamp(min=1)


#: the peer's classes replaced by fastcontrast.compat.patch("pytorch_metric_learning")
PATCH_TARGETS = {
    "pytorch_metric_learning.losses.ntxent_loss": {"NTXentLoss": NTXentLoss},
    "pytorch_metric_learning.losses.supcon_loss": {"SupConLoss": SupConLoss},
}
