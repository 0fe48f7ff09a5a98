"""The registry (tests/losses/_cases.py) holds every public loss and its nn.Module twin, and the
twins share their behaviour: informative reprs, and the distributed option. Each twin against
its functional form: tests/losses/test_<loss>.py."""
import pytest
import torch

import fastcontrast

from .._cases import CASES


def test_registry_holds_every_public_loss_and_its_module():
    """A loss added to fastcontrast.__all__ is run by the family contract only once registered."""
    modules = {n for n in fastcontrast.__all__ if n.endswith("Loss")}
    losses = {n for n in fastcontrast.__all__ if n.endswith(("_loss", "nce", "xent", "supcon"))}
    assert set(CASES) == losses
    assert {case.module.__name__ for case in CASES.values()} == modules


def test_module_distributed_option():
    """distributed=None is the single-process loss; a mode without a process group is refused by
    fastcontrast.distributed (the multi-process cases are in tests/distributed)."""
    q, k = torch.randn(6, 4), torch.randn(6, 4)
    fc = fastcontrast
    plain = fc.InfoNCELoss(temperature=0.2)(q, k)
    torch.testing.assert_close(plain, fc.info_nce(q, k, temperature=0.2))
    with pytest.raises(ValueError, match="distributed"):
        fc.InfoNCELoss(distributed="allgather")
    module = fc.ClipLoss(distributed="ring")
    assert "distributed='ring'" in repr(module)
    with pytest.raises(RuntimeError, match="process group"):
        module(q, k)


def test_module_reprs_are_informative():
    assert repr(fastcontrast.ClipLoss()) == (
        "ClipLoss(logit_scale=14.29, learnable=True, max_logit_scale=100, reduction='mean', "
        "backend='auto')")
    assert repr(fastcontrast.SigLIPLoss(learnable=False, backend="torch")) == (
        "SigLIPLoss(logit_scale=10, logit_bias=-10, learnable=False, reduction='mean', "
        "backend='torch')")
    assert repr(fastcontrast.InfoNCELoss(0.1, symmetric=True, learn_temperature=True)) == (
        "InfoNCELoss(temperature=0.1, learn_temperature=True, normalize=True, "
        "in_batch_negatives=True, exclude_self=False, symmetric=True, reduction='mean', "
        "backend='auto')")
    assert repr(fastcontrast.NTXentLoss(decoupled=True, dclw_sigma=0.5, reduction="sum")) == (
        "NTXentLoss(temperature=0.5, learn_temperature=False, normalize=True, decoupled=True, "
        "dclw_sigma=0.5, reduction='sum', backend='auto')")
    assert repr(fastcontrast.MoCoLoss(hcl_beta=1.0)) == (
        "MoCoLoss(temperature=0.07, learn_temperature=False, normalize=True, hcl_beta=1, "
        "reduction='mean', backend='auto')")
    assert repr(fastcontrast.SupConLoss(normalize=False)) == (
        "SupConLoss(temperature=0.1, learn_temperature=False, normalize=False, "
        "reduction='mean', backend='auto')")
