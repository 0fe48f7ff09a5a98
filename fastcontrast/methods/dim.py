"""Deep InfoMax (DIM): maximise the mutual information between an image's global vector and its
local features.

Paper: R Devon Hjelm, Alex Fedorov, Samuel Lavoie-Marchildon, Karan Grewal, Phil Bachman,
Adam Trischler, Yoshua Bengio, "Learning deep representations by mutual information estimation
and maximization", ICLR 2019.

An encoder maps x to a local feature map C(x) = {l_p : p = 1..P} (its M x M convolutional map)
and a global vector y = E(x) = f(C(x)) computed from it. A critic T(l, y) = <phi(l), psi(y)>
scores pairs, phi a 1x1-convolution network on the local features, psi an MLP on the global
vector. With the batch as the empirical distribution (pairs of one image positive, of two
images negative):

* local InfoNCE (the paper's DIM(L), eq. 5 with the NCE estimator):
      L_local = mean_{i, p} [ log sum_j exp T(l_{i,p}, y_j) - T(l_{i,p}, y_i) ]
  i.e. every local feature picks its own image's global vector among the B global vectors:
  ``fastcontrast.info_nce(query = the B * P local features, key = the B global vectors,
  targets = image index)``, fused, never materialising the (B P) x B scores.
* local JSD (the paper's eq. 4, Jensen-Shannon estimator, softplus sp):
      L_local = mean_{pos} sp(-T) + mean_{neg} sp(T)
  over all (B P) x B pairs (B P positives, B P (B - 1) negatives). This is not a softmax, so no
  fused InfoNCE kernel applies: it is a plain PyTorch formula on the materialised scores
  (O(B^2 P) memory; 2.4 M scores at the default batch of 256).
* global (DIM(G)): T(y_i, w_j) with w = chi(C(x)) a summary of the whole local map; InfoNCE
  ``info_nce(psi(y), chi(C))`` (key j of query i positive iff j == i) or JSD.
  ``objective`` = "local" | "global" | "both" (L = alpha L_global + beta L_local; the default
  "both", alpha = 0.5, beta = 1, one of the paper's settings).

Reported: "mi_bound" = log(B) - L_InfoNCE of the local (else global) term, the InfoNCE lower
bound on I(l; y) (for the JSD estimator the InfoNCE loss is evaluated on the same scores without
gradient), and "jsd" = the JSD objective when that estimator is used.

Deviations from the paper:
* encoder: ``SmallConvEncoder`` (3 conv layers on 24 x 24 cluttered digits) instead of a
  DCGAN / AlexNet-style encoder on CIFAR / STL / Tiny ImageNet. C(x) is its last 6 x 6 map
  (``local_layer=2``, P = 36; each position sees 18 x 18 pixels) or an earlier one
  (``local_layer`` 0 or 1), and f is the mean over positions (the paper: fully connected
  layers); the probe features are y.
* views (``cross_view=True``, the default): the local map comes from one fresh rendering of the
  digit and the global vector from another (other position, other clutter). With the paper's
  single image (``cross_view=False``) the cheapest shared information on this data is the
  clutter and the digit's position, which the local/global pairs learn first (measured with
  the second block's map as C(x): 33% probe after 300 steps, against 25-28% untrained).
* critic: phi, psi are two-layer networks with BatchNorm on the hidden layer, no residual
  shortcuts; chi is a 1x1 convolution averaged over positions (the paper flattens the map into
  fully connected layers; across two renderings the digit moves, and a position-wise linear
  summary would first have to learn to pool); scores are cosine similarities divided by
  ``temperature`` when ``normalize`` (the default, for stability), raw dot products when
  ``normalize=False`` and temperature 1.
* local InfoNCE normalises over the B global vectors for each local feature; the reference code
  normalises over other images' local features for each global vector (the other direction of
  the same bound; see ``amdim.py`` for that form).
* objective: the default is "both". The local term alone (the paper's best, DIM(L)) stayed at
  log(B) for the ~100 steps measurable on this shared machine: most of the 36 positions see
  background or clutter, so few local features carry any signal at first. The global term
  gives the encoder a signal from the start.
* no prior matching (the paper's adversarial gamma term) and no DIM(L) + DIM(G) weight search.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as fc
from ..backends import LOSS_BACKENDS as BACKENDS
from .._validation import (check_choice, check_flag, check_int, non_negative_float,
                           positive_scalar)
from .base import ContrastiveMethod
from .encoders import SmallConvEncoder

ESTIMATORS = ("infonce", "jsd")
OBJECTIVES = ("local", "global", "both")

DEFAULTS = {
    "data": "digits",
    "batch_size": 256,
    "lr": 1e-3,
    "seconds": 240,
    "estimator": "infonce",
    "objective": "both",
    "temperature": 0.1,
    "head_dim": 64,
    "cross_view": True,
    "width": 32,
    "out_dim": 128,
}


def render_batch(dataset, indices, generator):
    """One view of ``dataset[indices]``: ``dataset.render`` when it has one (ClutteredDigits),
    else the stacked items passed through ``dataset.augment`` when it exists."""
    if hasattr(dataset, "render"):
        return dataset.render(indices, generator)
    images = torch.stack([dataset[int(i)][0] for i in indices])
    augment = getattr(dataset, "augment", None)
    return augment(images, generator) if augment is not None else images


def check_images(images, channels):
    """A floating (B >= 2, channels, H, W) batch: a contrastive loss needs a negative."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating torch.Tensor, got "
                        f"{getattr(images, 'dtype', type(images).__name__)}")
    if images.dim() != 4 or images.shape[1] != channels or images.shape[0] < 2:
        raise ValueError(f"images must be (B >= 2, {channels}, H, W), got shape "
                         f"{tuple(images.shape)}")


def map_encoder(encoder, in_channels, out_dim, width, method):
    """``encoder`` if given (it must be a SmallConvEncoder: ``method`` needs its feature_maps()),
    else a new SmallConvEncoder(in_channels, out_dim, width)."""
    if encoder is None:
        return SmallConvEncoder(in_channels, out_dim=out_dim, width=width)
    if not isinstance(encoder, SmallConvEncoder):
        raise TypeError(f"encoder must be a SmallConvEncoder ({method} needs feature_maps()), "
                        f"got {type(encoder).__name__}")
    return encoder


def jsd_loss(scores, positive):
    """JSD estimator loss mean_{pos} softplus(-s) + mean_{neg} softplus(s) (Hjelm et al. eq. 4,
    negated) over a (R, C) score matrix; ``positive`` (R, C) bool marks the positive pairs."""
    return F.softplus(-scores[positive]).mean() + F.softplus(scores[~positive]).mean()


class DeepInfoMax(ContrastiveMethod):
    """DIM on a ``SmallConvEncoder`` (see the module docstring for the equations).

    ``loss({"local": images, "global": images})`` (two (B, C, H, W) batches, the same tensor
    for the paper's single view) returns {"loss", "mi_bound", ["jsd"]}."""

    name = "dim"

    def __init__(self, encoder=None, *, estimator="infonce", objective="both", temperature=0.1,
                 normalize=True, head_dim=64, cross_view=True, local_layer=2, alpha=0.5,
                 beta=1.0, in_channels=1, width=32, out_dim=128, backend="auto"):
        super().__init__()
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("objective", objective, OBJECTIVES)
        check_flag("normalize", normalize)
        check_flag("cross_view", cross_view)
        check_choice("backend", backend, BACKENDS)
        self.encoder = map_encoder(encoder, in_channels, out_dim, width, "DIM")
        self.local_layer = check_int("local_layer", local_layer, 0)
        if self.local_layer >= len(self.encoder.channels):
            raise ValueError(f"local_layer must index one of the encoder maps "
                             f"(0..{len(self.encoder.channels) - 1}), got {local_layer}")
        head_dim = check_int("head_dim", head_dim)
        self.estimator, self.objective, self.normalize = estimator, objective, normalize
        self.cross_view = cross_view
        self.temperature = float(positive_scalar("temperature", temperature, "cpu"))
        non_negative_float("alpha", alpha)
        non_negative_float("beta", beta)
        self.alpha, self.beta, self.backend = float(alpha), float(beta), backend
        local_channels = self.encoder.channels[self.local_layer]
        global_dim = self.encoder.feature_dim
        self.local_head = nn.Sequential(
            nn.Conv2d(local_channels, global_dim, 1), nn.BatchNorm2d(global_dim),
            nn.ReLU(inplace=True), nn.Conv2d(global_dim, head_dim, 1))
        self.global_head = nn.Sequential(
            nn.Linear(global_dim, global_dim), nn.BatchNorm1d(global_dim), nn.ReLU(inplace=True),
            nn.Linear(global_dim, head_dim))
        # chi: summary of the whole local map (1x1 convolution, mean over positions)
        self.map_head = nn.Conv2d(local_channels, head_dim, 1) if objective != "local" else None

    # -- interface -------------------------------------------------------------------------
    def views(self, dataset, indices, generator):
        """{"local": images, "global": images}: the same rendering (the paper), or two
        independent renderings when ``cross_view``."""
        local = render_batch(dataset, indices, generator)
        return {"local": local,
                "global": render_batch(dataset, indices, generator) if self.cross_view else local}

    def features(self, inputs):
        return self.encoder(inputs)

    def _maps(self, batch):
        """(local map of the "local" images, global vectors y of the "global" images)."""
        if not isinstance(batch, dict) or "local" not in batch or "global" not in batch:
            raise TypeError("batch must be a dict with 'local' and 'global' image batches "
                            "(from views())")
        local, glob = batch["local"], batch["global"]
        channels = self.encoder.blocks[0][0][0].in_channels
        check_images(local, channels)
        check_images(glob, channels)
        if glob is local:
            maps = self.encoder.feature_maps(local)
            return maps[self.local_layer], maps[-1].mean(dim=(2, 3))
        if glob.shape != local.shape:
            raise ValueError(f"batch['global'] must have the shape of batch['local'] "
                             f"{tuple(local.shape)}, got {tuple(glob.shape)}")
        b = local.shape[0]
        maps = self.encoder.feature_maps(torch.cat([local, glob]))  # one BatchNorm over both
        return maps[self.local_layer][:b], maps[-1][b:].mean(dim=(2, 3))

    def loss(self, batch):
        local, y = self._maps(batch)
        g = self.global_head(y)                                            # (B, d)
        out, total = {}, 0.0
        if self.objective != "global":
            b, p = local.shape[0], local.shape[2] * local.shape[3]
            local_codes = self.local_head(local).flatten(2).transpose(1, 2).reshape(b * p, -1)
            targets = torch.arange(b, device=local.device).repeat_interleave(p)
            term, out = self._term(local_codes, g, targets)
            total = total + self.beta * term
        if self.objective != "local":
            w = self.map_head(local).mean(dim=(2, 3))
            term, global_out = self._term(g, w, None)
            total = total + self.alpha * term
            out = out or global_out
        out["loss"] = total
        return out

    # -- estimators ------------------------------------------------------------------------
    def _scores(self, query, key):
        if self.normalize:
            query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
        return query @ key.T / self.temperature

    def _info_nce(self, query, key, targets):
        return fc.info_nce(query, key, temperature=self.temperature, normalize=self.normalize,
                           targets=targets, backend=self.backend)

    def _term(self, query, key, targets):
        """(loss, diagnostics) of one critic between query rows and key rows; query row r's
        positive is key targets[r] (key r when targets is None)."""
        log_n = math.log(key.shape[0])
        if self.estimator == "infonce":
            loss = self._info_nce(query, key, targets)
            return loss, {"mi_bound": (log_n - loss).detach()}
        rows = torch.arange(query.shape[0], device=query.device)
        positive = torch.zeros(query.shape[0], key.shape[0], dtype=torch.bool,
                               device=query.device)
        positive[rows, rows if targets is None else targets] = True
        loss = jsd_loss(self._scores(query, key), positive)
        with torch.no_grad():
            nce = self._info_nce(query.detach(), key.detach(), targets)
        return loss, {"mi_bound": log_n - nce, "jsd": loss.detach()}


TRAINING_SETTINGS = ("data", "batch_size", "lr", "seconds")


def build_from_defaults(cls, defaults, extra, backend, overrides):
    """``cls(backend=backend, **settings)`` with ``defaults`` updated by ``overrides`` minus the
    training settings (read by the trainer); an override that is neither a default nor in
    ``extra`` (other keyword arguments of ``cls``) raises a ValueError listing the valid ones."""
    unknown = set(overrides) - set(defaults) - set(extra)
    if unknown:
        raise ValueError(f"unknown {cls.name.upper()} settings {sorted(unknown)}; valid: "
                         f"{sorted(set(defaults) | set(extra))}")
    settings = {**defaults, **overrides}
    return cls(backend=backend, **{k: v for k, v in settings.items()
                                   if k not in TRAINING_SETTINGS})


def build(backend="auto", **overrides):
    """A DeepInfoMax with DEFAULTS' hyper-parameters (``overrides`` replace them)."""
    return build_from_defaults(DeepInfoMax, DEFAULTS, ("normalize", "local_layer", "alpha",
                                                       "beta", "in_channels",
                                                       "encoder"), backend, overrides)


__all__ = ["DeepInfoMax", "DEFAULTS", "build", "build_from_defaults", "jsd_loss",
           "map_encoder", "render_batch", "check_images"]
