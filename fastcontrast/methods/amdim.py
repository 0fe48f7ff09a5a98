"""Augmented Multiscale Deep InfoMax (AMDIM): contrast features of two augmented views across
layers and scales, with clipped scores.

Paper: Philip Bachman, R Devon Hjelm, William Buchwalter, "Learning Representations by
Maximizing Mutual Information Across Views", NeurIPS 2019.

Two views x_a, x_b of one image go through one encoder; its feature maps give a global vector
f_1 (the "1x1" scale) and local maps f_5, f_7 (the "5x5" and "7x7" scales), each passed through
a residual 1x1-convolution head into a common space of dimension d. For a source vector u_i of
view a and a target map {v_{j,p}} of view b (p over its P positions), the raw score is
    s(i; j, p) = <u_i, v_{j,p}> / sqrt(d)          (the paper; ``temperature=None``)
    s(i; j, p) = <u_i, v_{j,p}> / tau, |u| = |v| = 1   (the default here, tau = ``temperature``),
clipped softly as  s~ = c tanh(s / c)  (c = ``clip``), and the NCE loss of position p of image i
takes the positive (i, p) against every position of every other image:
    L(u -> v) = mean_{i,p} [ log( e^{s~(i;i,p)} + sum_{j != i, q} e^{s~(i;j,q)} ) - s~(i;i,p) ].
AMDIM sums three such pairs (1 -> 5, 1 -> 7, 5 -> 5, each in both directions a -> b and b -> a)
(``pairs``; here also 1 -> 1, see the deviations) and adds the score penalty
lambda * mean(s^2) over the raw scores of every pair (lambda = ``penalty``, 0.05 in the
paper's code).

Why the fused InfoNCE kernel is not used for the clipped scores: the kernels compute the
log-sum-exp of scores that are linear in <u, v> (a dot product times a scale); tanh clipping
applies a non-linear function to every score before the exponential, and no rescaling,
normalisation or extra key turns logsumexp_j c tanh(s_j / c) into a logsumexp of dot products.
So with ``clip`` set, each pair is computed in plain PyTorch on its B x (B P) score matrix
(bounded memory: B^2 P floats per pair, 0.6 M at the default batch 128 and P = 36; nothing
grows with the data set). With ``clip=None`` (no clipping) the same candidate sets go through
``fastcontrast.info_nce`` (fused, ``backend`` passed through): queries are the source vectors
repeated per position, keys the target positions (key r is the positive of query r,
``in_batch_negatives=False``), the shared negative bank is the same target positions, and
``query_ids`` / ``negative_ids`` = image index drop the image's own positions from its negatives.
The penalty is then evaluated without the score matrix through
sum_{r,k} <u_r, v_k>^2 = <U^T U, V^T V>_F (d x d Gram matrices).

"mi_bound" = mean over the terms of log(1 + (B - 1) P) - L (the InfoNCE bound for that many
candidates, on the clipped scores when clipping).

Deviations from the paper:
* encoder: ``SmallConvEncoder`` on 24 x 24 cluttered digits (the paper: a ResNet-like encoder
  without padding on 128 x 128 ImageNet / STL / CIFAR). Its last map (6 x 6) plays "5x5", the
  second block's map (6 x 6, an earlier layer with a smaller receptive field) plays "7x7", the
  mean of the last map is the global "1x1" vector and the probe feature.
* pairs: the default adds 1 -> 1 (global vector of one view against the global vectors of the
  other, the same clipped NCE with P = 1), which the paper does not have. On this data most
  local positions see background or clutter, so the local targets carry little signal early
  on: with only the paper's three pairs the loss stayed at log(1 + (B - 1) P) and the probe at
  the untrained level (26-32%) for the 90-140 steps measured on this shared machine, while
  with 1 -> 1 added the probe reached 44% after 52 steps. ``pairs=("1-5", "1-7", "5-5")``
  gives the paper's objective.
* 5 -> 5: the source is one random position per image of the source view's last map (drawn with
  the batch's generator), against all positions of the other view.
* views: each view is a fresh rendering of the digit (random position and clutter) followed by
  ``random_resized_crops`` (area fraction in ``crop_scale``, resized back to the canvas);
  ``fresh_renderings=False`` crops both views from one rendering (the paper's two augmentations
  of one image; here the shared clutter is then an easy cue). No colour jitter / grey-scale
  (grey digits), no flips (digits are not flip-invariant).
* heads: one residual head W1 x + W3 ReLU(BN(W2 x)) per scale, d = ``head_dim`` (64, paper
  1024+); the BatchNorm is ours.
* scores: by default cosine similarities over tau = 0.1 (|s| <= 10, so the clipping at c = 10
  still bends the largest scores) instead of the paper's raw dot products over sqrt(d)
  (``temperature=None``), which with our 64-d heads start near 0 for every pair.
* optimisation: Adam with a constant learning rate for a few minutes, batch 128 (paper: Adam,
  batch 200+, mixed precision, 150+ epochs); no BatchNorm removal or other encoder tricks.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as fc
from ..backends import LOSS_BACKENDS as BACKENDS
from .._validation import check_choice, check_int, positive_scalar
from .base import ContrastiveMethod
from .data import random_resized_crops
from .dim import build_from_defaults, check_images, map_encoder, render_batch

PAIRS = ("1-5", "1-7", "5-5", "1-1")

DEFAULTS = {
    "data": "digits",
    "batch_size": 128,
    "lr": 1e-3,
    "seconds": 240,
    "clip": 10.0,
    "penalty": 0.05,
    "temperature": 0.1,
    "head_dim": 64,
    "crop_scale": (0.5, 1.0),
    "fresh_renderings": True,
    "pairs": PAIRS,
    "width": 32,
    "out_dim": 128,
}


class ResidualHead(nn.Module):
    """AMDIM's 1x1-convolution head: x -> W1 x + W3 ReLU(BN(W2 x)) on a (B, C, H, W) map."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.mlp = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1),
                                 nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
                                 nn.Conv2d(out_channels, out_channels, 1))

    def forward(self, x):
        return self.shortcut(x) + self.mlp(x)


def clipped_nce(source, target, clip, scale):
    """(L, mean raw score^2) of AMDIM's NCE with tanh-clipped scores, plain PyTorch.

    source (B, d), target (B, d, P); s(i; j, p) = scale <source_i, target_{j,p}>,
    s~ = clip tanh(s / clip), L = mean_{i,p} [logaddexp(s~(i;i,p), lse_{j != i, q} s~(i;j,q))
    - s~(i;i,p)]. Memory: the B x B x P scores."""
    b = target.shape[0]
    raw = torch.einsum("id,jdp->ijp", source, target) * scale
    scores = clip * torch.tanh(raw / clip)
    eye = torch.eye(b, dtype=torch.bool, device=source.device)
    positive = scores[eye]                                                     # (B, P)
    negatives = scores.masked_fill(eye[:, :, None], float("-inf")).flatten(1)
    lse_negative = torch.logsumexp(negatives, dim=1, keepdim=True)             # (B, 1)
    loss = (torch.logaddexp(positive, lse_negative) - positive).mean()
    return loss, raw.pow(2).mean()


def fused_nce(source, target, scale, backend):
    """The same loss without clipping through ``fastcontrast.info_nce`` (see the module
    docstring), and the mean squared raw score from the d x d Gram matrices."""
    b, d, p = target.shape
    keys = target.transpose(1, 2).reshape(b * p, d)
    queries = source.repeat_interleave(p, dim=0)
    ids = torch.arange(b, device=source.device).repeat_interleave(p)
    loss = fc.info_nce(queries, keys, keys, temperature=1.0 / scale, normalize=False,
                       in_batch_negatives=False, query_ids=ids, negative_ids=ids,
                       backend=backend)
    squares = (source.T @ source * (keys.T @ keys)).sum() * scale ** 2       # sum_{i,k} s_ik^2
    return loss, squares / (b * b * p)


class AMDIM(ContrastiveMethod):
    """AMDIM on a ``SmallConvEncoder`` (equations in the module docstring).

    ``loss({"view_a", "view_b"})`` (two (B, C, H, W) batches) returns {"loss", "mi_bound",
    "nce", "penalty"}. ``clip=None`` disables tanh clipping and uses the fused info_nce."""

    name = "amdim"

    def __init__(self, encoder=None, *, clip=10.0, penalty=0.05, temperature=0.1, head_dim=64,
                 crop_scale=(0.5, 1.0), fresh_renderings=True, pairs=PAIRS, in_channels=1,
                 width=32, out_dim=128, backend="auto"):
        super().__init__()
        check_choice("backend", backend, BACKENDS)
        self.encoder = map_encoder(encoder, in_channels, out_dim, width, "AMDIM")
        self.clip = None if clip is None else float(positive_scalar("clip", clip, "cpu"))
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or penalty < 0:
            raise ValueError(f"penalty must be a float >= 0, got {penalty!r}")
        lo, hi = crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < lo <= hi <= 1, got {crop_scale}")
        pairs = tuple(pairs)
        if not pairs or any(pair not in PAIRS for pair in pairs):
            raise ValueError(f"pairs must be a non-empty subset of {PAIRS}, got {pairs}")
        head_dim = check_int("head_dim", head_dim)
        if not isinstance(fresh_renderings, bool):
            raise TypeError(f"fresh_renderings must be a bool, got "
                            f"{type(fresh_renderings).__name__}")
        self.fresh_renderings = fresh_renderings
        # score scale: 1 / temperature on unit vectors, or AMDIM's 1 / sqrt(d) on raw vectors
        self.normalize = temperature is not None
        self.scale = (1.0 / float(positive_scalar("temperature", temperature, "cpu"))
                      if self.normalize else 1.0 / math.sqrt(head_dim))
        self.penalty, self.crop_scale, self.pairs, self.backend = (float(penalty), (lo, hi),
                                                                   pairs, backend)
        _, mid, last = self.encoder.channels
        self.heads = nn.ModuleDict({"1": ResidualHead(last, head_dim),
                                    "5": ResidualHead(last, head_dim),
                                    "7": ResidualHead(mid, head_dim)})

    def views(self, dataset, indices, generator):
        """Two views, each a random resized crop of a rendering: of one shared rendering (the
        paper: two augmentations of one image) or of two fresh renderings (``fresh_renderings``:
        also the digit's position and the clutter differ)."""
        shared = None if self.fresh_renderings else render_batch(dataset, indices, generator)

        def view():
            images = shared if shared is not None else render_batch(dataset, indices, generator)
            return random_resized_crops(images, images.shape[-1], self.crop_scale, generator)
        return {"view_a": view(), "view_b": view(),
                "source_position": torch.randint(0, 2 ** 31 - 1, (2, len(indices)),
                                                 generator=generator)}

    def features(self, inputs):
        return self.encoder(inputs)

    def _scales(self, images):
        """{"1": (B, d), "5": (B, d, P5), "7": (B, d, P7)} for one view batch (unit vectors
        along d when ``temperature`` is set); a "1" target is the map of one position."""
        _, mid, last = self.encoder.feature_maps(images)
        scales = {"1": self.heads["1"](last.mean(dim=(2, 3), keepdim=True)).flatten(1),
                  "5": self.heads["5"](last).flatten(2),
                  "7": self.heads["7"](mid).flatten(2)}
        if self.normalize:
            scales = {k: F.normalize(v, dim=1) for k, v in scales.items()}
        return scales

    def loss(self, batch):
        if not isinstance(batch, dict) or "view_a" not in batch or "view_b" not in batch:
            raise TypeError("batch must be a dict with 'view_a' and 'view_b' (from views())")
        view_a, view_b = batch["view_a"], batch["view_b"]
        channels = self.encoder.blocks[0][0][0].in_channels
        check_images(view_a, channels)
        check_images(view_b, channels)
        if view_a.shape != view_b.shape:
            raise ValueError(f"view_b must have the shape of view_a {tuple(view_a.shape)}, got "
                             f"{tuple(view_b.shape)}")
        b = view_a.shape[0]
        both = self._scales(torch.cat([view_a, view_b]))    # one BatchNorm over the 2B views
        per_view = [{k: v[:b] for k, v in both.items()}, {k: v[b:] for k, v in both.items()}]
        draws = batch.get("source_position")
        if draws is None:
            draws = torch.zeros(2, b, dtype=torch.int64, device=view_a.device)
        nce, squares, bound = [], [], []
        for direction, (src, trg) in enumerate((per_view, per_view[::-1])):
            for pair in self.pairs:
                s, t = pair.split("-")
                source = src[s]
                if s == "5":   # one random source position per image
                    where = (draws[direction] % source.shape[2]).to(source.device)
                    source = source[torch.arange(b, device=source.device), :, where]
                target = trg[t] if t != "1" else trg[t].unsqueeze(2)
                if self.clip is None:
                    loss, square = fused_nce(source, target, self.scale, self.backend)
                else:
                    loss, square = clipped_nce(source, target, self.clip, self.scale)
                nce.append(loss)
                squares.append(square)
                bound.append(math.log(1 + (b - 1) * target.shape[2]) - loss.detach())
        nce_total, penalty = sum(nce), self.penalty * sum(squares)
        return {"loss": nce_total + penalty, "mi_bound": sum(bound) / len(bound),
                "nce": nce_total.detach(), "penalty": penalty.detach()}


def build(backend="auto", **overrides):
    """An AMDIM with DEFAULTS' hyper-parameters (``overrides`` replace them)."""
    return build_from_defaults(AMDIM, DEFAULTS, ("pairs", "in_channels", "encoder"), backend,
                               overrides)


__all__ = ["AMDIM", "DEFAULTS", "build", "clipped_nce", "fused_nce", "ResidualHead"]
