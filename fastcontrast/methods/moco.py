"""MoCo: momentum contrast with a queue of negative keys (v1, and v2's head and augmentations).

He, Fan, Wu, Xie and Girshick (2020), "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020 (v1); Chen, Fan, Girshick and He (2020), "Improved Baselines with Momentum
Contrastive Learning", arXiv:2003.04297 (v2).

A query encoder f_q (parameters theta_q, trained by back-propagation) and a key encoder f_k
(theta_k, no gradient) encode two augmented views of each image: q = f_q(x_q), k+ = f_k(x_k).
A queue holds the K most recent keys u_1..u_K of earlier batches. With L2-normalised vectors,

    L_q = -log( exp(q.k+ / tau) / (exp(q.k+ / tau) + sum_{j=1..K} exp(q.u_j / tau)) )

(``fastcontrast.moco_loss``, fused), averaged over the batch. After each step the key encoder
follows the query encoder, theta_k <- m theta_k + (1 - m) theta_q (``fastcontrast.
momentum_update``), and the batch's keys are enqueued, the oldest dequeued
(``fastcontrast.NegativeQueue``). Shuffling BN: keys are computed on a batch permuted across
devices and un-permuted afterwards, so the BatchNorm statistics of a query's sub-batch and of
its key's sub-batch come from different samples (no leak of "which sample is which" through
the batch statistics). v2 adds a 2-layer MLP head (as SimCLR's), blur and stronger colour
augmentation, tau = 0.2 and a cosine schedule. Each row has K + 1 candidates, so the logged
InfoNCE bound is log(K + 1) - L.

Deviations from the papers, all for a small CPU benchmark:

* Data and augmentations: the cluttered translated digits of ``fastcontrast.methods.data`` (fresh
  rendering per view: random position and clutter in place of random resized crops) with the
  grey-level intensity jitter of ``simclr.intensity_jitter``; no flips, no grey-scale
  conversion (already grey), no colour. v2's random Gaussian blur is implemented
  (``blur_p``) but off by default: on 24 x 24 digits it blurs away the strokes (probe 84.0% with
  blur_p = 0.5 against 87.9% without, 300 s, same seed).
* Encoder: ``SmallConvEncoder`` (3 conv layers, 128-d) instead of ResNet-50; v2's head
  Linear(128, 128) - BN - ReLU - Linear(128, 64) instead of 2048 - 2048 - 128 (the BN in the
  head is SimCLR's; MoCo v2's head has none); v1's head is a linear layer to 64.
* Queue K = 512 (about 40% of the 1258 training digits) instead of 65536, m = 0.9 instead of
  0.999 (a few hundred steps instead of 200 epochs of ImageNet; with m = 0.99 and K = 2048 the
  probe stayed under 45% after 500 steps), shuffle-BN over 2 emulated devices, Adam
  (lr 1e-3, no schedule) instead of SGD 0.03 with a cosine or step schedule, batch 256.
  Queue entries that are earlier keys of the same image are not used as negatives
  (``moco_loss(query_index=...)``); the paper keeps them.
* Shuffle-BN: on one process it is emulated by splitting the batch into ``bn_splits``
  sub-batches that each have their own BatchNorm statistics (the query batch unshuffled, the key
  batch shuffled across sub-batches before f_k and unshuffled after), like the official CIFAR
  demo's SplitBatchNorm. With torch.distributed initialised (world size > 1; ``fastcontrast
  train moco --nproc N``) the real one is used: key images are all-gathered
  (``fastcontrast.distributed.all_gather_with_grad``), shuffled with a permutation broadcast
  from rank 0, each rank encodes its slice, and the keys are gathered and unshuffled; after
  the step every rank enqueues the keys of all ranks in rank order
  (``fastcontrast.distributed.enqueue_all``), so the queue stays identical on every rank.
  The loss stays ``moco_loss`` on the local queries: keys and queue carry no gradient, so
  the mean of the ranks' losses is the global batch's and DDP's gradient average is exact.
* The queue starts filled with random unit vectors (as the official code) and the first
  momentum update happens after the first optimizer step (equivalent to the paper's update
  at the start of the next forward pass).
"""
import copy
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import NegativeQueue, moco_loss, momentum_update
from .._validation import check_choice
from .base import ContrastiveMethod
from .encoders import SmallConvEncoder
from .simclr import DEFAULTS as SIMCLR_DEFAULTS
from .simclr import check_batch, draw_views, intensity_jitter, projection_head, settings

# SimCLR's settings (data, optimiser, budget, temperature, encoder and head sizes, jitter), on
# which this MoCo v2 is compared with it, plus MoCo's own.
DEFAULTS = {**SIMCLR_DEFAULTS, "version": 2, "queue_size": 512, "momentum": 0.9, "bn_splits": 2,
            "blur_p": 0.0}


def gaussian_blur(images, p, generator, *, sigma=(0.1, 1.0)):
    """MoCo v2 / SimCLR blur: with probability ``p`` per image, a separable Gaussian blur of
    standard deviation ~ U(sigma) pixels (radius 2, zero padding); other images unchanged."""
    b, c = images.shape[:2]
    apply = torch.rand(b, generator=generator) < p
    s = sigma[0] + (sigma[1] - sigma[0]) * torch.rand(b, generator=generator)
    x = torch.arange(-2, 3, dtype=torch.float32)
    kernel = torch.exp(-x ** 2 / (2 * s[:, None] ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)
    kernel = torch.where(apply[:, None], kernel, (x == 0).float()).to(images)  # (b, 5)
    # one group per (image, channel): the per-image kernel along rows, then columns
    flat = images.reshape(1, b * c, *images.shape[2:])
    weight = kernel.repeat_interleave(c, 0)
    flat = F.conv2d(flat, weight.view(b * c, 1, 5, 1), padding=(2, 0), groups=b * c)
    flat = F.conv2d(flat, weight.view(b * c, 1, 1, 5), padding=(0, 2), groups=b * c)
    return flat.view_as(images)


def _distributed(group=None):
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class MoCo(ContrastiveMethod):
    """Query encoder + head, momentum key encoder + head, queue; MoCo v1 or v2.

    ``loss(batch)`` takes ``{"query": (N, C, H, W), "key": (N, C, H, W), "index": (N,) int64,
    "shuffle": (N,) permutation}`` (``views`` draws it) and returns ``{"loss", "mi_bound",
    "accuracy"}`` (accuracy: fraction of queries whose positive key scores above every queue
    entry). ``after_step`` updates the key encoder and enqueues the keys of the last ``loss``.
    ``features(x)`` = the query encoder's output (before the head)."""

    name = "moco"
    data_parallel = True

    def __init__(self, encoder, *, version=2, projection_dim=64, temperature=0.2,
                 queue_size=512, momentum=0.9, bn_splits=2, jitter_p=0.8, blur_p=0.0,
                 backend="auto"):
        super().__init__()
        if not isinstance(encoder, nn.Module) or not hasattr(encoder, "feature_dim"):
            raise TypeError(f"encoder must be an nn.Module with a feature_dim attribute, got "
                            f"{type(encoder).__name__}")
        if version not in (1, 2):
            raise ValueError(f"version must be 1 or 2, got {version!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive float, got {temperature!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
        if not isinstance(bn_splits, int) or bn_splits < 1:
            raise ValueError(f"bn_splits must be a positive int, got {bn_splits!r}")
        for name, value in (("jitter_p", jitter_p), ("blur_p", blur_p)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value!r}")
        check_choice("backend", backend, ("auto", "reference", "torch", "cpu", "triton"))
        dim = encoder.feature_dim
        head = (projection_head(dim, dim, projection_dim) if version == 2
                else nn.Linear(dim, projection_dim))
        self.encoder_q = encoder
        self.head_q = head
        self.encoder_k = copy.deepcopy(encoder)
        self.head_k = copy.deepcopy(head)
        for p in list(self.encoder_k.parameters()) + list(self.head_k.parameters()):
            p.requires_grad_(False)
        self.queue = NegativeQueue(queue_size, projection_dim, store_indices=True)
        with torch.no_grad():  # the official code starts from random unit vectors
            self.queue.enqueue(F.normalize(torch.randn(queue_size, projection_dim), dim=1),
                               indices=torch.full((queue_size,), -1, dtype=torch.int64))
        self.version, self.temperature, self.momentum = version, float(temperature), momentum
        self.bn_splits, self.jitter_p = bn_splits, float(jitter_p)
        self.blur_p = float(blur_p) if version == 2 else 0.0
        self.backend = backend
        self._pending = None  # (keys, indices) of the last loss, enqueued by after_step

    def _augment(self, images, generator):
        images = intensity_jitter(images, self.jitter_p, generator)
        return gaussian_blur(images, self.blur_p, generator) if self.blur_p > 0 else images

    def views(self, dataset, indices, generator):
        """Query and key views of ``dataset[indices]``, their indices, and the key shuffle."""
        query, key = draw_views(dataset, indices, generator)
        indices = torch.as_tensor(indices, dtype=torch.int64)
        return {"query": self._augment(query, generator), "key": self._augment(key, generator),
                "index": indices, "shuffle": torch.randperm(len(indices), generator=generator)}

    def _split_forward(self, encoder, head, x):
        """head(encoder(x)) with each of ``bn_splits`` consecutive sub-batches normalised by its
        own BatchNorm statistics (one sub-batch per emulated device; fewer sub-batches when the
        batch is too small to give each at least 2 samples)."""
        splits = max(1, min(self.bn_splits, x.shape[0] // 2))
        return torch.cat([head(encoder(part)) for part in x.tensor_split(splits)])

    @torch.no_grad()
    def _keys(self, x, shuffle):
        """Shuffle-BN key encoding: permute, encode per sub-batch (or per rank), un-permute."""
        if _distributed(self.group):
            from .. import distributed as fcd

            gathered = fcd.all_gather_with_grad(x.flatten(1), group=self.group).view(
                -1, *x.shape[1:])  # the key images of every rank, in rank order (no grad)
            order = torch.randperm(len(gathered), device=x.device)
            source = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            dist.broadcast(order, src=source, group=self.group)
            rank, n = dist.get_rank(self.group), x.shape[0]
            mine = order[rank * n:(rank + 1) * n]
            keys = fcd.all_gather_with_grad(self.head_k(self.encoder_k(gathered[mine])),
                                            group=self.group)
            keys = keys[torch.argsort(order)]
            return keys[rank * n:(rank + 1) * n]
        keys = self._split_forward(self.encoder_k, self.head_k, x[shuffle])
        return keys[torch.argsort(shuffle)]

    def loss(self, batch):
        query, key = check_batch(batch, ("query", "key"))
        n = query.shape[0]
        if n < 2:
            raise ValueError(f"MoCo needs at least 2 images per batch (BatchNorm), got {n}")
        index, shuffle = batch.get("index"), batch.get("shuffle")
        for name, t in (("index", index), ("shuffle", shuffle)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (n,):
                raise ValueError(f"batch[{name!r}] must be an int64 tensor of shape ({n},), "
                                 f"got {getattr(t, 'shape', type(t).__name__)}")
        if not torch.equal(torch.sort(shuffle).values, torch.arange(n, device=shuffle.device)):
            raise ValueError("batch['shuffle'] must be a permutation of 0..N-1")
        if _distributed(self.group):  # each rank's batch is one device's sub-batch
            q = self.head_q(self.encoder_q(query))
        else:
            q = self._split_forward(self.encoder_q, self.head_q, query)
        k = F.normalize(self._keys(key, shuffle), dim=1)
        loss = moco_loss(q, k, self.queue, temperature=self.temperature, query_index=index,
                         backend=self.backend)
        with torch.no_grad():
            qn = F.normalize(q.detach(), dim=1)
            positive = (qn * k).sum(1)
            negatives = qn @ self.queue.negatives().T
            negatives = negatives.masked_fill(index[:, None] == self.queue.stored_indices(),
                                              -float("inf"))
            accuracy = (positive > negatives.max(1).values).float().mean()
        self._pending = (k, index)
        return {"loss": loss, "mi_bound": math.log(len(self.queue) + 1) - loss.detach(),
                "accuracy": accuracy}

    @torch.no_grad()
    def after_step(self):
        """theta_k <- m theta_k + (1 - m) theta_q, then enqueue the last batch's keys."""
        momentum_update(self.encoder_k, self.encoder_q, self.momentum)
        momentum_update(self.head_k, self.head_q, self.momentum)
        if self._pending is not None:
            keys, index = self._pending
            if _distributed(self.group):  # every rank's keys, in rank order, on every rank
                from .. import distributed as fcd

                fcd.enqueue_all(self.queue, keys, indices=index, group=self.group)
            else:
                self.queue.enqueue(keys, indices=index)
            self._pending = None

    def features(self, inputs):
        return self.encoder_q(inputs)


def build(backend="auto", **overrides):
    """A MoCo with DEFAULTS updated by ``overrides`` (unknown keys raise a ValueError)."""
    cfg = settings("MoCo", DEFAULTS, overrides)
    encoder = SmallConvEncoder(out_dim=cfg["feature_dim"], width=cfg["width"])
    return MoCo(encoder, version=cfg["version"], projection_dim=cfg["projection_dim"],
                temperature=cfg["temperature"], queue_size=cfg["queue_size"],
                momentum=cfg["momentum"], bn_splits=cfg["bn_splits"],
                jitter_p=cfg["jitter_p"], blur_p=cfg["blur_p"], backend=backend)
