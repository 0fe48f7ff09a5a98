"""nn.Module twins: they forward to the functional API and own their parameters correctly."""
import math

import pytest
import torch

import fastcontrast
from fastcontrast.reference import clip_loss_reference, info_nce_reference, siglip_loss_reference


def test_info_nce_loss_module_matches_functional():
    q, k = torch.randn(10, 8), torch.randn(10, 8)
    module = fastcontrast.InfoNCELoss(temperature=0.2, symmetric=True, backend="torch")
    expected = info_nce_reference(q.double(), k.double(), temperature=0.2, symmetric=True)
    assert torch.allclose(module(q, k).double(), expected, rtol=1e-5)
    assert "temperature=0.2" in repr(module)


def test_info_nce_loss_learnable_temperature_gets_gradient():
    module = fastcontrast.InfoNCELoss(temperature=0.1, learn_temperature=True, backend="torch")
    q, k = torch.randn(12, 5), torch.randn(12, 5)
    module(q, k).backward()
    assert math.isclose(float(module.temperature.detach()), 0.1, rel_tol=1e-6)
    grad = module.log_inverse_temperature.grad
    # Reference gradient w.r.t. log(1/tau) through float64 autograd.
    log_inv = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    info_nce_reference(q.double(), k.double(), temperature=torch.exp(-log_inv)).backward()
    assert torch.allclose(grad.double(), log_inv.grad, rtol=1e-4)
    assert set(dict(module.named_parameters())) == {"log_inverse_temperature"}


def test_clip_loss_module_clamps_logit_scale_like_openclip():
    module = fastcontrast.ClipLoss(init_logit_scale=500.0, backend="torch")
    assert float(module.logit_scale.detach()) == 100.0
    image, text = torch.randn(7, 6), torch.randn(7, 6)
    loss = module(image, text)
    expected = clip_loss_reference(image.double(), text.double(), 100.0)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    loss.backward()
    assert module.log_logit_scale.grad == 0  # clamped: no gradient, as in OpenCLIP


def _log_parameter_grad(loss_of_scale, value):
    """d loss / d log(value) through float64 autograd."""
    log_value = torch.tensor(math.log(value), dtype=torch.float64, requires_grad=True)
    loss_of_scale(log_value.exp()).backward()
    return log_value.grad


def test_clip_loss_module_learns_scale_and_round_trips_state():
    module = fastcontrast.ClipLoss(init_logit_scale=10.0, backend="torch")
    image, text = torch.randn(9, 4), torch.randn(9, 4)
    module(image, text).backward()
    expected = _log_parameter_grad(
        lambda scale: clip_loss_reference(image.double(), text.double(), scale), 10.0)
    assert expected.abs() > 1e-3  # the scale matters here
    torch.testing.assert_close(module.log_logit_scale.grad.double(), expected, rtol=1e-4,
                               atol=1e-6)
    frozen = fastcontrast.ClipLoss(init_logit_scale=3.0, learnable=False)
    frozen.load_state_dict(module.state_dict())
    assert torch.equal(frozen.log_logit_scale, module.log_logit_scale.detach())
    assert list(frozen.parameters()) == []


def test_siglip_module_owns_scale_and_bias():
    image, text = torch.randn(6, 5), torch.randn(6, 5)
    module = fastcontrast.SigLIPLoss()
    image64, text64 = image.double(), text.double()
    expected = siglip_loss_reference(image64, text64, 10.0, -10.0)
    torch.testing.assert_close(module(image, text).double(), expected, rtol=1e-5, atol=1e-5)
    module(image, text).backward()
    d_log_scale = _log_parameter_grad(
        lambda scale: siglip_loss_reference(image64, text64, scale, -10.0), 10.0)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    siglip_loss_reference(image64, text64, 10.0, bias).backward()
    torch.testing.assert_close(module.log_logit_scale.grad.double(), d_log_scale, rtol=1e-4,
                               atol=1e-6)
    torch.testing.assert_close(module.logit_bias.grad.double(), bias.grad, rtol=1e-4, atol=1e-6)
    frozen = fastcontrast.SigLIPLoss(learnable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert torch.allclose(frozen(image, text, logit_scale=2.0, logit_bias=0.5),
                          fastcontrast.siglip_loss(image, text, 2.0, 0.5))
    with pytest.raises(ValueError, match="init_logit_scale"):
        fastcontrast.SigLIPLoss(init_logit_scale=0.0)


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
