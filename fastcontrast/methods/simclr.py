"""SimCLR: contrastive learning of visual representations from two augmented views.

Chen, Kornblith, Norouzi and Hinton (2020), "A Simple Framework for Contrastive Learning of
Visual Representations", ICML 2020.

Each image x_i is augmented twice, a_i = t(x_i), b_i = t'(x_i); an encoder f gives
h = f(x) (the representation kept for downstream tasks) and a projection head g (a 2-layer MLP)
gives z = g(h). With the 2N projections z_1..z_2N of a batch, sim(u, v) = u.v / (|u| |v|) and
j(i) the other view of the same image, the NT-Xent loss is

    l_i = -log( exp(sim(z_i, z_j(i)) / tau) / sum_{k != i} exp(sim(z_i, z_k) / tau) ),
    L   = (1 / 2N) sum_i l_i

(``fastcontrast.nt_xent``, fused). Each row has 2N - 1 candidates, so the logged InfoNCE bound
on the mutual information of the two views is log(2N - 1) - L.

Deviations from the paper, all for a small CPU benchmark:

* Data: the cluttered translated digits of ``fastcontrast.methods.data`` (24 x 24 grey canvases,
  1258 training digits) instead of ImageNet / CIFAR-10.
* Augmentations: a view is a fresh rendering (random position of the digit and random clutter
  fragments; this plays the role of random crop + resize) followed by a random intensity scale
  and offset (a grey-level stand-in for colour jitter, probability ``jitter_p``). No flips (digits
  are not flip-invariant), no colour drop (grey images) and no blur (8 x 8 digits).
* Encoder: ``SmallConvEncoder`` (3 conv layers with BatchNorm, 128-d) instead of ResNet-50;
  projection head Linear(128, 128) - BN - ReLU - Linear(128, 64) (the paper's head has the
  width of the representation, 2048, and output 128).
* Optimisation: Adam, lr 1e-3, batch 256, tau 0.2, a 5 minute budget, instead of LARS with a
  lr of 0.3 x batch / 256, batch 4096, tau 0.1-0.5, weight decay 1e-6, 100-1000 epochs with
  warm-up and cosine decay. BatchNorm statistics are those of the 2N views together (the
  paper's global BN across devices is the same thing on one process). Data-parallel
  (``fastcontrast train simclr --nproc N``): the loss is ``fastcontrast.distributed.nt_xent``
  over all ranks' views, BatchNorm statistics stay per rank (no SyncBatchNorm on CPU), and the
  accuracy diagnostic compares each rank's rows with its own views only.
"""
import math

import torch
from torch import nn

from .. import nt_xent
from .._validation import check_choice
from .base import ContrastiveMethod
from .encoders import SmallConvEncoder

DEFAULTS = {
    "data": "digits",
    "batch_size": 256,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "seconds": 300,
    "temperature": 0.2,
    "feature_dim": 128,
    "width": 32,
    "projection_dim": 64,
    "jitter_p": 0.8,
}


def draw_views(dataset, indices, generator):
    """Two independent renderings of ``dataset[indices]``: ``dataset.two_views`` when it has one
    (ClutteredDigits), else its ``augment`` applied twice to the stacked items."""
    if hasattr(dataset, "two_views"):
        return dataset.two_views(indices, generator)
    if not callable(getattr(dataset, "augment", None)):
        raise TypeError(f"dataset must have two_views(indices, generator) or an augment(images, "
                        f"generator) callable, got {type(dataset).__name__}")
    images = torch.stack([dataset[int(i)][0] for i in indices])
    return dataset.augment(images, generator), dataset.augment(images, generator)


def intensity_jitter(images, p, generator, *, scale=(0.6, 1.4), shift=0.2):
    """Grey-level colour jitter: with probability ``p`` per image, x -> clamp(a x + b, 0, 1) with
    contrast a ~ U(scale) and brightness b ~ U(-shift, shift); other images unchanged."""
    b = images.shape[0]
    shape = (b,) + (1,) * (images.dim() - 1)
    apply = torch.rand(b, generator=generator) < p
    a = scale[0] + (scale[1] - scale[0]) * torch.rand(b, generator=generator)
    offset = shift * (2 * torch.rand(b, generator=generator) - 1)
    a = torch.where(apply, a, torch.ones_like(a)).to(images).view(shape)
    offset = torch.where(apply, offset, torch.zeros_like(offset)).to(images).view(shape)
    return (a * images + offset).clamp(0, 1)


def check_batch(batch, keys):
    """The tensors batch[k] for k in ``keys``: 4-D image batches of one shape, dtype and device."""
    if not isinstance(batch, dict):
        raise TypeError(f"batch must be a dict with keys {keys} (from views()), got "
                        f"{type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise ValueError(f"batch is missing {missing}; expected keys {keys}")
    tensors = [batch[k] for k in keys]
    first = tensors[0]
    for k, t in zip(keys, tensors):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() != 4:
            got = (f"shape {tuple(t.shape)}, dtype {t.dtype}" if isinstance(t, torch.Tensor)
                   else type(t).__name__)
            raise ValueError(f"batch[{k!r}] must be a floating (N, C, H, W) tensor, got {got}")
        if t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"batch[{k!r}] must match batch[{keys[0]!r}] (shape "
                             f"{tuple(first.shape)}, {first.dtype}, {first.device}), got shape "
                             f"{tuple(t.shape)}, {t.dtype}, {t.device}")
    return tensors


def projection_head(in_dim, hidden_dim, out_dim):
    """SimCLR's 2-layer MLP g(h) = W2 ReLU(BN(W1 h)) (MoCo v2 uses the same head)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


class SimCLR(ContrastiveMethod):
    """Encoder + projection head trained with NT-Xent on two views of each image.

    ``loss(batch)`` takes ``{"view_a": (N, C, H, W), "view_b": (N, C, H, W)}`` (``views`` draws
    it) and returns ``{"loss", "mi_bound", "accuracy"}``: accuracy is the fraction of the 2N rows
    whose most similar other view is their positive. ``features(x)`` = encoder(x)."""

    name = "simclr"
    data_parallel = True

    def __init__(self, encoder, *, projection_dim=64, temperature=0.2, jitter_p=0.8,
                 backend="auto"):
        super().__init__()
        if not isinstance(encoder, nn.Module) or not hasattr(encoder, "feature_dim"):
            raise TypeError(f"encoder must be an nn.Module with a feature_dim attribute, got "
                            f"{type(encoder).__name__}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive float, got {temperature!r}")
        if not 0.0 <= jitter_p <= 1.0:
            raise ValueError(f"jitter_p must lie in [0, 1], got {jitter_p!r}")
        check_choice("backend", backend, ("auto", "reference", "torch", "cpu", "triton"))
        self.encoder = encoder
        dim = encoder.feature_dim
        self.head = projection_head(dim, dim, projection_dim)
        self.temperature = float(temperature)
        self.jitter_p = float(jitter_p)
        self.backend = backend

    def views(self, dataset, indices, generator):
        """Two independent augmented views of ``dataset[indices]``."""
        view_a, view_b = draw_views(dataset, indices, generator)
        return {"view_a": intensity_jitter(view_a, self.jitter_p, generator),
                "view_b": intensity_jitter(view_b, self.jitter_p, generator)}

    def loss(self, batch):
        view_a, view_b = check_batch(batch, ("view_a", "view_b"))
        n = view_a.shape[0]
        if n < 2:
            raise ValueError(f"SimCLR needs at least 2 images per batch (negatives), got {n}")
        z = self.head(self.encoder(torch.cat([view_a, view_b])))
        z_a, z_b = z[:n], z[n:]
        if self.distributed_mode is None:
            loss = nt_xent(z_a, z_b, temperature=self.temperature, backend=self.backend)
        else:  # data-parallel: this rank's rows against the views of every rank
            from .. import distributed as fcd

            loss = fcd.nt_xent(z_a, z_b, temperature=self.temperature, backend=self.backend,
                               mode=self.distributed_mode, group=self.group)
        with torch.no_grad():
            zn = nn.functional.normalize(z.detach(), dim=1)
            sims = zn @ zn.T
            sims.fill_diagonal_(-float("inf"))
            positive = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
            accuracy = (sims.argmax(1) == positive).float().mean()
        views = 2 * n * self.world_size()  # the candidates span every rank's views
        return {"loss": loss, "mi_bound": math.log(views - 1) - loss.detach(),
                "accuracy": accuracy}

    def features(self, inputs):
        return self.encoder(inputs)


def settings(method, defaults, overrides):
    """``defaults`` updated by ``overrides``; a key not in ``defaults`` raises a ValueError."""
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {method} settings {unknown}; known: {sorted(defaults)}")
    return {**defaults, **overrides}


def build(backend="auto", **overrides):
    """A SimCLR with DEFAULTS updated by ``overrides`` (unknown keys raise a ValueError)."""
    cfg = settings("SimCLR", DEFAULTS, overrides)
    encoder = SmallConvEncoder(out_dim=cfg["feature_dim"], width=cfg["width"])
    return SimCLR(encoder, projection_dim=cfg["projection_dim"],
                  temperature=cfg["temperature"], jitter_p=cfg["jitter_p"], backend=backend)
