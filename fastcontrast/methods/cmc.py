"""Contrastive Multiview Coding (CMC): one encoder per view, contrast the views of one sample
against the views of other samples.

Paper: Yonglong Tian, Dilip Krishnan, Phillip Isola, "Contrastive Multiview Coding", ECCV 2020.

V views v^1..v^V of a sample (here: filtered or cropped parts of a digit image), encoder f_k
and linear embedding h_k per view, z^k = h_k(f_k(v^k)) / |h_k(f_k(v^k))|. For two views j, k
and a batch of B samples, the two-view loss is
    L(V_j, V_k) = L_{j->k} + L_{k->j},
    L_{j->k} = -mean_i log( e^{<z^j_i, z^k_i>/tau} / sum_{m in C} e^{<z^j_i, z^k_m>/tau} ),
with candidates C the B samples of the batch (``negatives="batch"``: ``fastcontrast.info_nce(
z^j, z^k, symmetric=True)``, fused, which returns (L_{j->k} + L_{k->j}) / 2) or the batch plus a
bank of earlier embeddings of view k (``negatives="queue"``: one ``NegativeQueue`` per view;
``info_nce(z^j, z^k, bank_k)`` with query_ids / negative_ids so a sample's own earlier
embeddings are not its negatives). With more than two views:
    core view:  L = sum_{k > 1} L(V_1, V_k)          (``graph="core"``)
    full graph: L = sum_{j < k} L(V_j, V_k)          (``graph="full"``)
(each pair term here is the mean of its two directions). The representation for the probes
is the concatenation [f_1(v^1), ..., f_V(v^V)] of the view encoders' outputs.

Views (``views``, names): "low" / "high" (``filtered_views``: Gaussian low-pass G * x and
high-pass x - G * x, the grey-image stand-in for CMC's L / ab colour channels), "top" /
"bottom" / "left" / "right" (``split_halves``), "full" (the image itself).

"mi_bound" = log(n) - mean pair loss, n the candidates per row (B, plus the bank).

Deviations from the paper:
* data: cluttered 24 x 24 digits. Unless ``shared_rendering=True`` (the paper's setting: all
  views cut from one image), each view is cut from its own fresh rendering (another position
  and clutter), so position and clutter are not shared information the views could match on;
  with one shared rendering the views agree on where the digit and the clutter are.
* encoders: a ``SmallConvEncoder`` per view (out_dim 64, so two views give a 128-d feature),
  instead of half-width AlexNet / ResNet encoders on ImageNet or STL-10; embedding dimension
  ``projection_dim`` (64, paper 128). No flips or crops besides the rendering.
* memory: the paper keeps a memory bank of one embedding per training sample, updated with
  momentum 0.5, and samples 4096-16384 negatives with NCE or a softmax; here
  ``negatives="queue"`` keeps a FIFO ``NegativeQueue`` of the last ``queue_size`` embeddings per
  view (no momentum) and uses the exact softmax over the batch plus the queue.
* optimisation: Adam at a constant learning rate for a few minutes (paper: SGD, 200+ epochs).
* data-parallel (``fastcontrast train cmc --nproc N``, ``negatives="batch"`` only): each pair
  term is ``fastcontrast.distributed.info_nce(..., symmetric=True)`` over every rank's samples.
"""
import math

import torch
from torch import nn

from .. import functional as fc
from ..backends import LOSS_BACKENDS as BACKENDS
from .._validation import check_choice, check_ids, check_int, positive_scalar
from ..queue import NegativeQueue
from .base import ContrastiveMethod
from .data import filtered_views, split_halves
from .dim import build_from_defaults, check_images, render_batch
from .encoders import SmallConvEncoder

VIEWS = ("low", "high", "top", "bottom", "left", "right", "full")
GRAPHS = ("core", "full")
NEGATIVES = ("batch", "queue")

DEFAULTS = {
    "data": "digits",
    "batch_size": 256,
    "lr": 1e-3,
    "seconds": 240,
    "views": ("low", "high"),
    "graph": "core",
    "negatives": "batch",
    "temperature": 0.1,
    "queue_size": 1024,
    "projection_dim": 64,
    "width": 32,
    "out_dim": 64,
    "sigma": 1.0,
}


def view_transform(name, images, sigma):
    """The view ``name`` (one of VIEWS) of a (B, C, H, W) batch."""
    if name in ("low", "high"):
        return filtered_views(images, sigma)[name == "high"]
    if name == "full":
        return images
    halves = split_halves(images, "rows" if name in ("top", "bottom") else "cols")
    return halves[name in ("bottom", "right")]


class CMC(ContrastiveMethod):
    """Contrastive Multiview Coding (equations in the module docstring).

    ``loss({"views": [V tensors (B, C, H_k, W_k)], "index": (B,) int64})`` returns {"loss",
    "mi_bound"}; ``features(x)`` concatenates every view encoder on its view of x."""

    name = "cmc"
    data_parallel = True

    def __init__(self, *, views=("low", "high"), graph="core", negatives="batch",
                 temperature=0.1, queue_size=1024, projection_dim=64, shared_rendering=False,
                 sigma=1.0, in_channels=1, width=32, out_dim=64, backend="auto"):
        super().__init__()
        views = tuple(views)
        if len(views) < 2 or any(v not in VIEWS for v in views) or len(set(views)) != len(views):
            raise ValueError(f"views must be 2 or more distinct names from {VIEWS}, got {views}")
        check_choice("graph", graph, GRAPHS)
        check_choice("negatives", negatives, NEGATIVES)
        check_choice("backend", backend, BACKENDS)
        if not isinstance(shared_rendering, bool):
            raise TypeError(f"shared_rendering must be a bool, got "
                            f"{type(shared_rendering).__name__}")
        self.view_names, self.graph, self.negatives = views, graph, negatives
        self.temperature = float(positive_scalar("temperature", temperature, "cpu"))
        self.sigma = float(positive_scalar("sigma", sigma, "cpu"))
        self.shared_rendering, self.backend = shared_rendering, backend
        self.in_channels = check_int("in_channels", in_channels)
        projection_dim = check_int("projection_dim", projection_dim)
        self.encoders = nn.ModuleList(SmallConvEncoder(in_channels, out_dim=out_dim, width=width)
                                      for _ in views)
        self.heads = nn.ModuleList(nn.Linear(out_dim, projection_dim) for _ in views)
        self.queues = nn.ModuleList(
            NegativeQueue(check_int("queue_size", queue_size), projection_dim, store_indices=True)
            for _ in views) if negatives == "queue" else None
        self._pending = None   # (embeddings per view, indices) enqueued by after_step
        n = len(views)
        self.pairs = ([(0, k) for k in range(1, n)] if graph == "core" else
                      [(j, k) for j in range(n) for k in range(j + 1, n)])

    def views(self, dataset, indices, generator):
        indices = torch.as_tensor(indices, dtype=torch.int64)
        shared = render_batch(dataset, indices, generator) if self.shared_rendering else None
        return {"views": [view_transform(name, shared if shared is not None else
                                         render_batch(dataset, indices, generator), self.sigma)
                          for name in self.view_names],
                "index": indices}

    def features(self, inputs):
        return torch.cat([encoder(view_transform(name, inputs, self.sigma))
                          for name, encoder in zip(self.view_names, self.encoders)], dim=1)

    def _check_batch(self, batch):
        if not isinstance(batch, dict) or "views" not in batch:
            raise TypeError("batch must be a dict with 'views' (a list of view batches) and "
                            "'index' (from views())")
        views = batch["views"]
        if len(views) != len(self.view_names):
            raise ValueError(f"batch['views'] must hold {len(self.view_names)} views "
                             f"{self.view_names}, got {len(views)}")
        for view in views:
            check_images(view, self.in_channels)
        b = views[0].shape[0]
        if any(view.shape[0] != b for view in views):
            raise ValueError(f"every view must have B = {b} samples, got "
                             f"{[view.shape[0] for view in views]}")
        index = batch.get("index")
        if self.negatives == "queue":
            check_ids("batch['index']", index, b, views[0].device)
        return views, index

    def _pair_loss(self, z, j, k, index):
        """(mean of the j -> k and k -> j losses, candidates per row)."""
        if self.negatives == "batch" and self.distributed_mode is not None:
            from .. import distributed as fcd

            loss = fcd.info_nce(z[j], z[k], temperature=self.temperature, symmetric=True,
                                backend=self.backend, mode=self.distributed_mode,
                                group=self.group)
            return loss, z[j].shape[0] * self.world_size()
        if self.negatives == "batch":
            loss = fc.info_nce(z[j], z[k], temperature=self.temperature, symmetric=True,
                               backend=self.backend)
            return loss, z[j].shape[0]
        if self.distributed_mode is not None:
            raise ValueError("CMC with negatives='queue' trains on one process only; use "
                             "negatives='batch' (the default) data-parallel")
        losses, banks = [], []
        for a, b in ((j, k), (k, j)):
            queue = self.queues[b]
            bank = queue.negatives() if len(queue) else None
            ids = dict(query_ids=index, negative_ids=queue.stored_indices()) if bank is not None \
                else {}
            losses.append(fc.info_nce(z[a], z[b], bank, temperature=self.temperature,
                                      backend=self.backend, **ids))
            banks.append(len(queue))
        return sum(losses) / 2, z[j].shape[0] + sum(banks) / 2

    def loss(self, batch):
        views, index = self._check_batch(batch)
        z = [head(encoder(view)) for view, encoder, head in
             zip(views, self.encoders, self.heads)]
        terms = [self._pair_loss(z, j, k, index) for j, k in self.pairs]
        total = sum(loss for loss, _ in terms)
        bound = sum(math.log(n) - loss.detach() for loss, n in terms) / len(terms)
        if self.queues is not None:
            self._pending = ([nn.functional.normalize(t.detach(), dim=1) for t in z], index)
        return {"loss": total, "mi_bound": bound}

    def after_step(self):
        """Push this step's embeddings into the per-view queues (``negatives="queue"``)."""
        if self._pending is None:
            return
        embeddings, index = self._pending
        for queue, embedding in zip(self.queues, embeddings):
            queue.enqueue(embedding, indices=index)
        self._pending = None


def build(backend="auto", **overrides):
    """A CMC with DEFAULTS' hyper-parameters (``overrides`` replace them)."""
    return build_from_defaults(CMC, DEFAULTS, ("shared_rendering", "in_channels"), backend,
                               overrides)


__all__ = ["CMC", "DEFAULTS", "build", "view_transform", "VIEWS"]
