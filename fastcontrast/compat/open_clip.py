"""OpenCLIP's losses (``open_clip.loss`` of open-clip-torch 3.3.0) on fastcontrast's fused kernels.

    from fastcontrast.compat.open_clip import ClipLoss     # was: from open_clip.loss import ...
    loss = ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world_size)
    losses = loss(image_features, text_features, logit_scale, output_dict=True)

Constructor and forward signatures, defaults and return values are OpenCLIP's; the logits are
never materialised. With t_ij = logit_scale <image_i, text_j> (+ logit_bias, which cancels in a
softmax and gets a zero gradient):

    ClipLoss    (CE_rows(t) + CE_cols(t)) / 2, pair i the positive    (fastcontrast.clip_loss)
    SigLipLoss  -(1/N) sum_ij log sigmoid(y_ij t_ij), y = 2I - 1        (fastcontrast.siglip_loss)
    CoCaLoss    clip_loss_weight * ClipLoss, caption_loss_weight * the token cross-entropy of
                the captioner (torch's cross_entropy, ignore_index=pad_id; nothing to fuse)
    DistillClipLoss  (ClipLoss, (H(softmax(d_ij), softmax(t_ij)) over rows + over columns) / 2)
                with d_ij = dist_logit_scale <dist_image_i, dist_text_j> the teacher's logits,
                both terms in one fused pass (fastcontrast.distill_clip_loss); world_size > 1:
                fastcontrast.distributed's clip_loss and distill_info_nce (two passes)

``logit_scale`` / ``logit_bias``: python floats, 0-dim tensors or shape (1,) tensors (OpenCLIP's
``nonscalar_logit_scale``); the gradient comes back in the caller's shape. ``logit_scale`` must be
positive and finite for ClipLoss, finite for SigLipLoss (ValueError). ``cache_labels`` is
accepted and has no effect (there are no label tensors to cache). ``use_horovod=True`` raises
NotImplementedError. The helper methods ``get_logits`` / ``get_ground_truth`` are not
provided (they build the logits).

Distributed (``world_size > 1``): ``rank`` and ``world_size`` must be those of the default
torch.distributed process group (ValueError otherwise). Every rank's features receive the
gradient of the SUM over the ranks of the returned losses (fastcontrast.distributed's
convention), so after DDP averages the parameter gradients they equal the single-process
gradient of the loss on the concatenated batch, whatever ``local_loss`` / ``gather_with_grad``.
See ClipLoss and SigLipLoss for what each option returns and where that differs from OpenCLIP.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import functional as fcf
from .._validation import check_int

__all__ = ["ClipLoss", "SigLipLoss", "CoCaLoss", "DistillClipLoss", "PATCH_TARGETS"]

SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")
# OpenCLIP's exchange patterns -> fastcontrast.distributed's modes: the neighbour exchanges
# travel around a ring, all_reduce / all_gather broadcast every rank's texts.
_SIGLIP_MODES = {"bidir": "ring", "shift": "ring", "reduce": "gather", "gather": "gather"}


def _scalar(value):
    """OpenCLIP's shape (1,) logit_scale / logit_bias as a 0-dim view (the gradient flows back
    in the caller's shape); anything else unchanged for fastcontrast's checks."""
    if isinstance(value, torch.Tensor) and value.shape == (1,):
        return value.reshape(())
    return value


def _check_world(caller, rank, world_size, use_horovod):
    if use_horovod:
        raise NotImplementedError(f"{caller}: use_horovod=True is not supported (fastcontrast "
                                  "runs on torch.distributed); use torchrun and use_horovod=False")
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"{caller}: rank must be in [0, world_size - 1] = [0, {world_size - 1}], "
                         f"got {rank}")


def _check_group(caller, rank, world_size):
    """rank / world_size given at construction against the default process group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{caller}(world_size={world_size}) needs an initialised "
                           "torch.distributed process group (torch.distributed."
                           "init_process_group, or torchrun)")
    actual = (dist.get_rank(), dist.get_world_size())
    if actual != (rank, world_size):
        raise ValueError(f"{caller}: rank / world_size must be those of the default process "
                         f"group, (rank, world_size) = {actual}, got ({rank}, {world_size})")


class _MeanGradientOverRanks(torch.autograd.Function):
    """Identity forward; backward: the mean over the ranks of the gradient (every rank must run
    the backward). Gives a scalar used by every rank the gradient of the mean of their losses."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad / dist.get_world_size()


class ClipLoss(nn.Module):
    """OpenCLIP's ClipLoss: loss = (CE(t, rows) + CE(t^T, rows)) / 2 with
    t = logit_scale * image_features @ text_features^T (+ logit_bias), pair i the positive,
    features used as given (CLIP normalises them). Returns the 0-dim loss, or
    {"contrastive_loss": loss} with ``output_dict=True``.

    world_size > 1 (fastcontrast.distributed.clip_loss, mode "gather"):
      local_loss=True   returns this rank's loss: its images against every rank's texts and its
                        texts against every rank's images, mean over its own rows (OpenCLIP's
                        value; the mean over the ranks is the loss of the concatenated batch).
      local_loss=False  returns the loss of the concatenated batch on every rank (OpenCLIP's
                        value), computed once across the ranks rather than whole on each.
    Uneven batch sizes, which OpenCLIP cannot gather, work too: local_loss=True then returns
    W / N_total times the sum of this rank's row losses (W ranks, N_total rows in all), so the
    mean over the ranks is still the loss of the concatenated batch.
    Gradients, whatever ``gather_with_grad``: each rank's features get the gradient of the sum
    of the ranks' returned losses; ``logit_scale`` gets, with local_loss=False, the gradient of
    the whole-batch loss on every rank, with local_loss=True a share whose mean over the ranks
    is the whole-batch gradient (OpenCLIP splits it differently, each rank the gradient of its
    own loss; the same mean). That is OpenCLIP's gradient with ``gather_with_grad=True`` and,
    after DDP's average, the single-process gradient.

    With ``gather_with_grad=False`` OpenCLIP differs and this class deliberately does not
    follow it (OpenCLIP issue #616): the gathered features carry no gradient there, so with
    local_loss=False each rank's features get the gradient of one copy of the loss (after DDP
    1 / world_size of the single-process gradient, while logit_scale's is not scaled), and with
    local_loss=True only as the anchor of their own rows (as a candidate in the other
    modality's rows they get none). The maintainers advise local_loss=True with
    gather_with_grad=True; this class computes that gradient in every case, so
    ``gather_with_grad`` changes nothing here.
    """

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0,
                 world_size=1, use_horovod=False):
        super().__init__()
        _check_world(type(self).__name__, rank, world_size, use_horovod)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.use_horovod = use_horovod

    def _contrastive(self, image_features, text_features, logit_scale, logit_bias=None):
        scale, bias = _scalar(logit_scale), _scalar(logit_bias)
        if self.world_size == 1:
            return fcf.clip_loss(image_features, text_features, scale, logit_bias=bias)
        from .. import distributed as fcd  # torch.distributed's collectives only when used

        _check_group(type(self).__name__, self.rank, self.world_size)
        return self._over_ranks(
            lambda s: fcd.clip_loss(image_features, text_features, s, logit_bias=bias), scale)

    def _over_ranks(self, share, scale):
        """world_size > 1: ``share(scale)``, a fastcontrast.distributed loss (this rank's
        share), as OpenCLIP returns it: with local_loss the share itself, else the whole
        batch's value (the mean of the shares) with this share's gradient."""
        if self.local_loss:
            return share(scale)
        if isinstance(scale, torch.Tensor) and scale.requires_grad:
            # Every rank returns the whole-batch loss: its logit_scale gradient is the mean
            # over the ranks of their shares.
            scale = _MeanGradientOverRanks.apply(scale)
        part = share(scale)
        whole = part.detach().clone()
        dist.all_reduce(whole)
        # The value of the whole batch (the mean of the shares), the gradient of this share.
        return whole / self.world_size + (part - part.detach())

    def forward(self, image_features, text_features, logit_scale, logit_bias=None,
                output_dict=False):
        loss = self._contrastive(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class CoCaLoss(ClipLoss):
    """OpenCLIP's CoCaLoss: (clip_loss_weight * ClipLoss(image_features, text_features,
    logit_scale), caption_loss_weight * CE(logits, labels)), the caption term the mean token
    cross-entropy of logits (B, L, V) against labels (B, L), tokens equal to ``pad_id`` left out.
    A falsy clip_loss_weight gives the integer tensor 0 as the contrastive term (as OpenCLIP).
    Returns the pair, or {"contrastive_loss", "caption_loss"} with ``output_dict=True``.
    Distributed options as ClipLoss."""

    def __init__(self, caption_loss_weight, clip_loss_weight, pad_id=0, local_loss=False,
                 gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 use_horovod=False):
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size,
                         use_horovod=use_horovod)
        self.clip_loss_weight = clip_loss_weight
        self.caption_loss_weight = caption_loss_weight
        self.pad_id = pad_id

    def forward(self, image_features, text_features, logits, labels, logit_scale,
                output_dict=False):
        if self.clip_loss_weight:
            contrastive = self.clip_loss_weight * self._contrastive(
                image_features, text_features, logit_scale)
        else:
            contrastive = torch.tensor(0, device=logits.device)
        # cross_entropy wants the classes in dimension 1: (B, V, L).
        caption = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=self.pad_id)
        caption = caption * self.caption_loss_weight
        if output_dict:
            return {"contrastive_loss": contrastive, "caption_loss": caption}
        return contrastive, caption


class DistillClipLoss(ClipLoss):
    """OpenCLIP's DistillClipLoss: (contrastive_loss, distill_loss), the first ClipLoss's
    value on the student's (image_features, text_features, logit_scale), the second
    (dist(d, t) + dist(d^T, t^T)) / 2 with dist(d, t) = -mean_i sum_j softmax(d_i.)_j
    log_softmax(t_i.)_j, t the student's logits and d = dist_logit_scale dist_image_features
    @ dist_text_features^T the teacher's. Both from ONE fused pass over the score tiles
    (fastcontrast.distill_clip_loss). Returns the pair, or {"contrastive_loss",
    "distill_loss"} with ``output_dict=True``. The teacher (dist_*) gets no gradient (OpenCLIP
    leaves that to the caller's frozen teacher).

    world_size > 1: the contrastive term as ClipLoss's (local_loss, gradients: see there), the
    distillation term likewise from fastcontrast.distributed.distill_info_nce (symmetric, this
    rank's rows against every rank's; local_loss=True: the mean over this rank's rows, as
    OpenCLIP's; False: the whole batch's value on every rank). Two fused passes there (the
    distributed combined op does not exist yet), one single process."""

    def forward(self, image_features, text_features, logit_scale, dist_image_features,
                dist_text_features, dist_logit_scale, output_dict=False):
        scale, dist_scale = _scalar(logit_scale), _scalar(dist_logit_scale)
        if isinstance(dist_scale, torch.Tensor):
            dist_scale = dist_scale.detach()  # the teacher gets no gradient
        if self.world_size == 1:
            contrastive, distill = fcf.distill_clip_loss(
                image_features, text_features, dist_image_features, dist_text_features, scale,
                dist_scale)
        else:
            from .. import distributed as fcd

            contrastive = self._contrastive(image_features, text_features, scale)
            distill = self._over_ranks(lambda s: fcd.distill_info_nce(
                image_features, text_features, dist_image_features, dist_text_features,
                temperature=1 / s, teacher_temperature=1 / dist_scale, normalize=False), scale)
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class SigLipLoss(nn.Module):
    """OpenCLIP's SigLipLoss: loss = -(1/N) sum_{i,j} log sigmoid(y_ij t_ij),
    t_ij = logit_scale <image_i, text_j> + logit_bias, y_ij = +1 on the diagonal, -1 elsewhere;
    ``logit_bias=None`` is no bias. Returns the 0-dim loss, or {"contrastive_loss": loss} with
    ``output_dict=True``.

    world_size > 1 (fastcontrast.distributed.siglip_loss): this rank's images against the texts
    of every rank, summed, divided by this rank's batch size N_r (OpenCLIP's value for equal
    batch sizes; uneven ones, which OpenCLIP cannot exchange, divide by N_total / W, so the
    mean over the ranks is the loss of the concatenated batch). The texts' gradient is that of
    the sum of all ranks' losses, the scalars' that of this rank's loss, as OpenCLIP. Values
    and gradients are the same for every ``dist_impl``, which only picks the communication:
    'bidir' and 'shift' run the ring mode (texts travel rank to rank), 'reduce' and 'gather'
    the gather mode."""

    def __init__(self, cache_labels=False, rank=0, world_size=1, dist_impl=None):
        super().__init__()
        _check_world(type(self).__name__, rank, world_size, False)
        dist_impl = dist_impl or "bidir"
        if dist_impl not in SIGLIP_DIST_IMPLS:
            raise ValueError(f"dist_impl must be None or one of "
                             f"{', '.join(map(repr, SIGLIP_DIST_IMPLS))}, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.rank = rank
        self.world_size = world_size
        self.dist_impl = dist_impl

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict=False):
        scale = _scalar(logit_scale)
        bias = 0.0 if logit_bias is None else _scalar(logit_bias)
        if self.world_size == 1:
            loss = fcf.siglip_loss(image_features, text_features, scale, bias)
        else:
            from .. import distributed as fcd

            _check_group(type(self).__name__, self.rank, self.world_size)
            loss = fcd.siglip_loss(image_features, text_features, scale, bias,
                                   mode=_SIGLIP_MODES[self.dist_impl])
        return {"contrastive_loss": loss} if output_dict else loss


PATCH_TARGETS = {"open_clip.loss": {"ClipLoss": ClipLoss, "SigLipLoss": SigLipLoss,
                                    "CoCaLoss": CoCaLoss, "DistillClipLoss": DistillClipLoss}}
