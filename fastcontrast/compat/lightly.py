"""Drop-in classes for lightly 1.6's contrastive losses (``lightly.loss``), on fastcontrast's fused
losses: same constructor and forward arguments, defaults, attributes and return value (the mean
loss as a 0-dim tensor)::

    from fastcontrast.compat.lightly import NTXentLoss, DCLLoss, DCLWLoss

lightly 1.6 has no supervised contrastive loss; fastcontrast.SupConLoss (or the class in
fastcontrast.compat.pytorch_metric_learning) computes it.

Formulas (z^ = z / ||z||, s_ab = <z^_a, z^_b> / temperature, views [out0; out1], 2N rows):
    NTXentLoss  loss_i = logsumexp_{j != i} s_ij - s_{i, i+-N}, mean over the 2N rows
                (fastcontrast.nt_xent); with a memory bank of K keys u_k:
                loss_i = logsumexp(s(out0_i, out1_i), s(out0_i, u_1..K)) - s(out0_i, out1_i),
                mean over the N rows (fastcontrast.moco_loss)
    DCLLoss     loss_i = logsumexp_{j != i, i+-N} s_ij - w_i s_{i, i+-N}, mean over the 2N rows:
                the positive left out of the denominator (nt_xent(decoupled=True)); w_i = 1,
                or with lightly's negative_mises_fisher_weights as weight_fn, DCLW's
    DCLWLoss    w_i = 2 - N softmax_i(<z^0_i, z^1_i> / sigma) over the N pairs, detached as in
                lightly (added as (1 - w_i) s_{i, i+-N} to DCL's rows; fastcontrast's own
                dclw_sigma differentiates through w)

``gather_distributed=True`` with more than one process maps to fastcontrast.distributed (mode
"gather"): each rank's rows are contrasted with the views of every rank, and the returned loss
is this rank's mean over its own rows. Gradient convention, as lightly's GatherLayer: the inputs
of every rank receive the gradient of the SUM of all ranks' losses, so DDP's average of the
parameter gradients is the gradient of the loss on the concatenated batch. Every rank must pass
the same batch size (lightly's requirement too). DCLW's weights take the softmax over each
rank's own pairs, as lightly's. With a memory bank the loss is local (the bank holds the
negatives) and only the enqueue gathers: every rank enqueues the keys of all ranks.

Where the classes differ from lightly 1.6:
  * temperature must be > 0 (lightly accepts a negative one, abs(temperature) >= 1e-8).
  * DCLLoss / DCLWLoss with one pair (N = 1) have no negative: lightly returns -inf, these
    classes 0 (the fused loss of a row without a candidate).
  * NTXentLoss.memory_bank is a fastcontrast.NegativeQueue (lightly: a MemoryBankModule), None
    without a bank: its rows are ``memory_bank.keys`` (lightly's ``bank``), its write position
    ``next_slot`` (``bank_ptr``). The initial bank is not a difference: lightly's random draws.
  * DCLLoss accepts weight_fn=None and lightly's negative_mises_fisher_weights (the function or
    a functools.partial of it fixing sigma); any other weight_fn raises NotImplementedError.
"""
import functools

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as fcd
from .._validation import check_positive_number
from ..functional import moco_loss, nt_xent
from ..queue import NegativeQueue

__all__ = ["NTXentLoss", "DCLLoss", "DCLWLoss", "PATCH_TARGETS"]


def _check_temperature(temperature):
    check_positive_number("temperature", temperature)
    return float(temperature)


def _check_gather(gather_distributed):
    if not isinstance(gather_distributed, bool):
        raise TypeError(f"gather_distributed must be a bool, got "
                        f"{type(gather_distributed).__name__}")
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError("gather_distributed is True but torch.distributed is not available; "
                         "pass gather_distributed=False or use a torch build with distributed "
                         "support")


def _distributed(gather_distributed):
    """Whether the call gathers over processes: as lightly, only with more than one of them."""
    return (gather_distributed and torch.distributed.is_available()
            and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1)


def _check_pair(out0, out1):
    for name, t in (("out0", out0), ("out1", out1)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (batch_size, embedding_size), got "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if out0.shape != out1.shape:
        raise ValueError(f"out0 and out1 must have the same shape, got {tuple(out0.shape)} and "
                         f"{tuple(out1.shape)}")


def _bank_size(memory_bank_size):
    """lightly's memory_bank_size: 0 (no bank) or a (num_features, dim) pair; (0, dim) is no bank
    too. Returns (num_features, dim) or None."""
    if isinstance(memory_bank_size, bool):
        raise TypeError("memory_bank_size must be 0 or a (num_features, dim) tuple, got a bool")
    size = (memory_bank_size,) if isinstance(memory_bank_size, int) else tuple(memory_bank_size)
    if any(isinstance(x, bool) or not isinstance(x, int) for x in size):
        raise TypeError(f"memory_bank_size must hold ints, got {memory_bank_size!r}")
    if any(x < 0 for x in size):
        raise ValueError(f"memory_bank_size entries must be non-negative, got {memory_bank_size}")
    if len(size) == 1 and size[0] > 0:
        raise ValueError(f"memory_bank_size={memory_bank_size} does not give the feature "
                         f"dimension: pass ({memory_bank_size}, dim), or 0 for no memory bank")
    if size != (0,) and len(size) != 2:
        raise ValueError(f"memory_bank_size must be 0 or a (num_features, dim) tuple, got "
                         f"{memory_bank_size!r}")
    return size if len(size) == 2 and size[0] > 0 else None


class NTXentLoss(nn.Module):
    """lightly's NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False):
    SimCLR's NT-Xent (fastcontrast.nt_xent), or MoCo's InfoNCE against a memory bank when
    ``memory_bank_size`` = (num_features, dim) (fastcontrast.moco_loss).

    Memory bank (``self.memory_bank``, a fastcontrast.NegativeQueue whose buffers stay out of
    state_dict, as lightly's): filled at construction with num_features random unit vectors,
    drawn as lightly draws them (torch.randn from the global generator in float32, then
    L2-normalised), so with the same seed both start from the same bank and give the same losses
    from the first step. forward(out0, out1) computes the loss against the bank as it was
    before the call, then, only when out0 requires grad, enqueues the normalised out1 (every
    rank's with gather_distributed): lightly's ring, which writes at most up to the end of the
    bank and drops the rest of a batch that would wrap, then restarts at slot 0.
    """

    def __init__(self, temperature=0.5, memory_bank_size=0, gather_distributed=False):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        _check_gather(gather_distributed)
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        size = _bank_size(memory_bank_size)
        self.memory_bank = None
        if size is not None:
            self.memory_bank = NegativeQueue(*size, persistent=False)
            initial = F.normalize(torch.randn(size).float(), dim=-1)
            self.memory_bank.enqueue(initial)

    def forward(self, out0, out1):
        _check_pair(out0, out1)
        gather = _distributed(self.gather_distributed)
        if self.memory_bank is None:
            if gather:
                return fcd.nt_xent(out0, out1, temperature=self.temperature, mode="gather")
            return nt_xent(out0, out1, temperature=self.temperature)
        bank = self.memory_bank
        if out0.shape[1] != bank.dim:
            raise ValueError(f"out0 must have embedding_size {bank.dim} (the memory bank's dim), "
                             f"got {out0.shape[1]}")
        out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
        update = out0.requires_grad
        # The enqueue below overwrites the bank in place: the loss keeps its own copy.
        negatives = bank.negatives().to(out0.device, out0.dtype, copy=update)
        loss = moco_loss(out0, out1, negatives, temperature=self.temperature, normalize=False)
        if update:
            self._enqueue(out1.detach(), gather)
        return loss

    @torch.no_grad()
    def _enqueue(self, keys, gather):
        bank = self.memory_bank
        if gather:
            keys = fcd.all_gather_with_grad(keys.contiguous())
        # lightly writes up to the end of the bank and restarts at slot 0 without wrapping.
        kept = min(keys.shape[0], bank.size - bank.next_slot)
        bank.enqueue(keys[:kept].to(bank.keys.device))


def _sigma_of(weight_fn):
    """The sigma of lightly's negative_mises_fisher_weights given as weight_fn (the function
    itself, sigma 0.5, or a functools.partial fixing sigma by keyword), else None."""
    func, keywords = weight_fn, {}
    if isinstance(weight_fn, functools.partial) and not weight_fn.args:
        func, keywords = weight_fn.func, dict(weight_fn.keywords)
    if getattr(func, "__name__", None) != "negative_mises_fisher_weights":
        return None
    if not getattr(func, "__module__", "").startswith("lightly."):
        return None
    sigma = keywords.pop("sigma", 0.5)
    return None if keywords else sigma


class DCLLoss(nn.Module):
    """lightly's DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False): decoupled
    contrastive learning, 0.5 (loss(out0 -> out1) + loss(out1 -> out0)) with
    loss_i = logsumexp_{j != i, i+-N} s_ij - w_i s_{i, i+-N}, mean over the rows
    (fastcontrast.nt_xent(decoupled=True)); w_i = 1 without weight_fn, DCLW's weight with
    lightly's negative_mises_fisher_weights. Other weight_fn: NotImplementedError.
    The ``weight_fn`` attribute is the one passed (None for DCLWLoss, which stores ``sigma``)."""

    def __init__(self, temperature=0.1, weight_fn=None, gather_distributed=False):
        super().__init__()
        self.temperature = _check_temperature(temperature)
        _check_gather(gather_distributed)
        self._sigma = None
        if weight_fn is not None:
            sigma = _sigma_of(weight_fn)
            if sigma is None:
                raise NotImplementedError(
                    f"weight_fn={weight_fn!r}: fastcontrast computes DCL without weights "
                    "(weight_fn=None) and DCLW's negative_mises_fisher_weights (also as "
                    "functools.partial(negative_mises_fisher_weights, sigma=...)) only")
            self._sigma = _check_sigma(sigma)
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed

    def forward(self, out0, out1):
        _check_pair(out0, out1)
        options = dict(temperature=self.temperature, decoupled=True, reduction="none")
        if _distributed(self.gather_distributed):
            rows = fcd.nt_xent(out0, out1, mode="gather", **options)
        else:
            rows = nt_xent(out0, out1, **options)
        if self._sigma is not None:
            rows = rows + self._reweighting(out0, out1)
        return rows.mean()

    def _reweighting(self, out0, out1):
        """DCLW's -w_i s_p(i) as DCL's -s_p(i) plus (1 - w_i) s_p(i), w_i detached (lightly
        computes it from detached views; fastcontrast's dclw_sigma differentiates through it),
        the softmax over this process's N pairs (as lightly, also with gather_distributed)."""
        cosine = (F.normalize(out0, dim=1) * F.normalize(out1, dim=1)).sum(1)
        weight = 2 - out0.shape[0] * torch.softmax(cosine.detach() / self._sigma, dim=0)
        return ((1 - weight) * cosine / self.temperature).repeat(2)


def _check_sigma(sigma):
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise TypeError(f"sigma must be a float, got {type(sigma).__name__}")
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return float(sigma)


class DCLWLoss(DCLLoss):
    """lightly's DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False): DCLLoss with
    the positive weighted by w_i = 2 - N softmax_i(<z^0_i, z^1_i> / sigma), the softmax over the
    N pairs, no gradient through w."""

    def __init__(self, temperature=0.1, sigma=0.5, gather_distributed=False):
        sigma = _check_sigma(sigma)
        super().__init__(temperature=temperature, gather_distributed=gather_distributed)
        self._sigma = self.sigma = sigma


#: the peer's classes replaced by fastcontrast.compat.patch("lightly")
PATCH_TARGETS = {
    "lightly.loss.ntx_ent_loss": {"NTXentLoss": NTXentLoss},
    "lightly.loss.dcl_loss": {"DCLLoss": DCLLoss, "DCLWLoss": DCLWLoss},
}
