"""Contrastive Predictive Coding (CPC) on fastcontrast's fused InfoNCE.

Paper: Aaron van den Oord, Yazhe Li, Oriol Vinyals (2018), "Representation Learning with
Contrastive Predictive Coding", arXiv:1807.03748.

Model (paper, section 2):

    z_t = g_enc(x_t)                       strided convolutional encoder, one latent per window
    c_t = g_ar(z_{<=t})                    autoregressive context (a GRU)
    f_k(x_{t+k}, c_t) = exp(z_{t+k}^T W_k c_t)          one linear predictor W_k per step k
    L_k = -E[ log f_k(x_{t+k}, c_t) / sum_{x_j in X} f_k(x_j, c_t) ]        (InfoNCE)
    I(x_{t+k}; c_t) >= log(N) - L_k                     N = |X| candidates

Here, for a batch of B sequences with L latents each, every (sequence b, time t, step k) with
t + k < L is a query q = W_k c_{b,t}; its candidate set X is ALL B * L latents of the batch (other
sequences and other time steps, the true z_{b,t+k} among them), so N = B * L. Each step k is ONE
fused ``fastcontrast.info_nce(queries, latents, targets=b * L + t + k)`` call (the N_q x N
score matrix is never materialised by the fused backends); the loss is the mean of L_k over
k = 1..K. ``backend=`` is passed through, so ``backend="reference"`` gives the same computation
on materialised logits.

Diagnostics returned by ``loss``: ``mi_bound`` = log(N) - mean_k L_k, and per step k
``loss_k{k}``, ``mi_bound_k{k}`` and ``accuracy_k{k}``: the fraction of queries whose positive
scores highest among the N candidates, computed without gradients in blocks of
``accuracy_chunk`` queries (memory O(accuracy_chunk * N), never N_q x N). A default latent sees
76 input samples and latents are 16 samples apart, so for k <= 4 z_{t+k} shares input samples
with latents c_t has seen: those steps are nearly solved locally, and the slowly varying
(speaker) information has to carry the longer steps.

Representation for evaluation (``features``): the mean over time of the context vectors c_t of
the whole sequence, (B, context_dim), in whatever train/eval mode the caller has set.

Deviations from the paper:
* Data: ``fastcontrast.methods.data.SyntheticSpeakers`` (1-D synthetic sequences whose "speaker"
  is a set of close frequencies, resolvable only over a long context), not LibriSpeech; sequences of
  1024 samples, not 20480-sample windows, and the stored sequences are used as they are (no
  random windowing; CPC uses no other augmentation).
* Encoder: ``fastcontrast.methods.encoders.SequenceEncoder`` (4 strided conv1d blocks with
  BatchNorm, which the paper does not use, and a 1x1 projection; downsampling 16, receptive field 76
  samples) instead of the paper's five conv layers (strides 5, 4, 2, 2, 2, downsampling 160, 512
  channels, ReLU only); latent size 64 and GRU context size 128 instead of 512 and 256.
* Negatives: all latents of the batch, including earlier and later steps of the same sequence
  (the paper's audio experiments compare several sampling schemes: same speaker, mixed
  speakers, current sequence only); K = 8 prediction steps instead of 12.
* Optimiser and budget: Adam with lr 2e-3, batch 32 sequences, a few hundred steps within the
  time budget (paper: Adam 2e-4, 8 GPUs x 8 windows, hundreds of thousands of steps).
* Evaluation: the paper trains its linear classifiers on c_t; here c_t is averaged over the
  sequence and a logistic-regression probe (and kNN) is fitted on the frozen features.
"""
import math

import torch
from torch import nn

from .. import functional
from ..backends import LOSS_BACKENDS as BACKENDS
from .._validation import check_choice, check_flag, check_int, positive_scalar
from .base import ContrastiveMethod
from .encoders import SequenceEncoder

DEFAULTS = {
    # training settings (read by the trainer)
    "data": "speakers",
    "batch_size": 32,
    "lr": 2e-3,
    "seconds": 240,
    # the method's hyper-parameters (arguments of CPC)
    "latent_dim": 64,
    "context_dim": 128,
    "encoder_width": 64,
    "prediction_steps": 8,
    "temperature": 1.0,
    "normalize": False,
    "accuracy_chunk": 256,
}

TRAINING_KEYS = ("data", "batch_size", "lr", "seconds")


def _chunked_accuracy(queries, keys, targets, normalize, chunk):
    """Fraction of rows i with argmax_j <q_i, k_j> (k normalised when ``normalize``) == targets[i],
    scoring ``chunk`` queries at a time: memory O(chunk * M). The query's norm and the
    temperature scale a whole row, so they do not change its arg-max."""
    with torch.no_grad():
        keys = nn.functional.normalize(keys, dim=1) if normalize else keys
        hits = 0
        for start in range(0, len(queries), chunk):
            scores = queries[start:start + chunk] @ keys.T
            hits += int((scores.argmax(1) == targets[start:start + chunk]).sum())
        return hits / len(queries)


class CPC(ContrastiveMethod):
    """CPC: g_enc (SequenceEncoder), g_ar (GRU), predictors W_k, InfoNCE per step k (module doc).

    Input sequences are (B, in_channels, T) with T a multiple of 16 and T / 16 > prediction_steps.
    """

    name = "cpc"

    def __init__(self, *, in_channels=1, latent_dim=64, context_dim=128, encoder_width=64,
                 prediction_steps=8, temperature=1.0, normalize=False, accuracy_chunk=256,
                 backend="auto"):
        super().__init__()
        self.prediction_steps = check_int("prediction_steps", prediction_steps)
        self.accuracy_chunk = check_int("accuracy_chunk", accuracy_chunk)
        check_flag("normalize", normalize)
        check_choice("backend", backend, BACKENDS)
        self.temperature = float(positive_scalar("temperature", temperature, "cpu"))
        self.normalize = normalize
        self.backend = backend
        self.encoder = SequenceEncoder(in_channels, check_int("latent_dim", latent_dim),
                                       check_int("encoder_width", encoder_width))
        self.context = nn.GRU(latent_dim, check_int("context_dim", context_dim), batch_first=True)
        self.predictors = nn.ModuleList(nn.Linear(context_dim, latent_dim, bias=False)
                                        for _ in range(self.prediction_steps))

    # -- networks --------------------------------------------------------------------------

    def _check_sequences(self, name, x):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of sequences, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
        steps = self.encoder.downsample
        if (x.dim() != 3 or x.shape[0] == 0 or x.shape[1] != self.encoder.in_channels
                or x.shape[2] % steps or x.shape[2] // steps <= self.prediction_steps):
            raise ValueError(
                f"{name} must be (B >= 1, {self.encoder.in_channels}, T) with T a multiple of "
                f"{steps} and T / {steps} > prediction_steps = {self.prediction_steps} (T >= "
                f"{steps * (self.prediction_steps + 1)}), got shape {tuple(x.shape)}")
        parameter = next(self.parameters())
        if x.dtype != parameter.dtype or x.device != parameter.device:
            raise TypeError(f"{name} must have the dtype and device of the model "
                            f"({parameter.dtype}, {parameter.device}), got {x.dtype}, {x.device}")

    def latents_and_context(self, x):
        """z (B, L, latent_dim) = g_enc(x) and c (B, L, context_dim) = GRU(z), L = T / 16."""
        self._check_sequences("sequences", x)
        z = self.encoder(x).transpose(1, 2)
        c, _ = self.context(z)
        return z, c

    # -- ContrastiveMethod interface ---------------------------------------------------------

    def views(self, dataset, indices, generator=None):
        """The sequences dataset[i][0] for i in ``indices``, stacked to (B, C, T), on the model's
        device and dtype. CPC needs a single view and no augmentation (``generator`` unused)."""
        if isinstance(indices, torch.Tensor):
            indices = indices.tolist()
        parameter = next(self.parameters())
        batch = torch.stack([dataset[i][0] for i in indices])
        return batch.to(device=parameter.device, dtype=parameter.dtype)

    def loss(self, batch):
        """{"loss": mean_k L_k, "mi_bound": log(B L) - mean_k L_k, and per k: loss_k{k},
        mi_bound_k{k}, accuracy_k{k}} for a batch of sequences (B, C, T)."""
        z, c = self.latents_and_context(batch)
        b, length, dim = z.shape
        keys = z.reshape(b * length, dim)              # every latent of the batch is a candidate
        time = torch.arange(length, device=z.device)
        row = (torch.arange(b, device=z.device) * length)[:, None]
        log_n = math.log(b * length)
        out, losses = {}, []
        for k, predictor in enumerate(self.predictors, start=1):
            queries = predictor(c[:, :length - k]).reshape(-1, dim)     # W_k c_t, t < L - k
            targets = (row + time[k:]).reshape(-1)                       # index of z_{b, t+k}
            loss_k = functional.info_nce(queries, keys, targets=targets,
                                         temperature=self.temperature, normalize=self.normalize,
                                         backend=self.backend)
            losses.append(loss_k)
            out[f"loss_k{k}"] = loss_k.detach()
            out[f"mi_bound_k{k}"] = log_n - loss_k.detach()
            out[f"accuracy_k{k}"] = torch.tensor(_chunked_accuracy(
                queries.detach(), keys.detach(), targets, self.normalize, self.accuracy_chunk),
                device=z.device)
        loss = torch.stack(losses).mean()
        out["loss"] = loss
        out["mi_bound"] = log_n - loss.detach()
        return out

    def features(self, inputs):
        """Mean over time of the context vectors c_t: (B, context_dim)."""
        _, c = self.latents_and_context(inputs)
        return c.mean(dim=1)


def build(backend="auto", **overrides):
    """A CPC with DEFAULTS updated by ``overrides`` (unknown names raise ValueError; the
    training settings in TRAINING_KEYS are accepted and left to the trainer)."""
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"unknown CPC settings {unknown}; valid ones are {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **overrides}
    return CPC(backend=backend, **{key: value for key, value in settings.items()
                                   if key not in TRAINING_KEYS})
