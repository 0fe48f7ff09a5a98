"""clip_loss (CLIP's symmetric InfoNCE with a logit scale and optional bias): every fused
backend against the float64 reference (values and the gradients of image, text, logit_scale,
logit_bias) over odd shapes x dtypes, the ClipLoss module (OpenCLIP's clamp of the scale, its
learned scale and state) and bad input. The properties every loss shares:
tests/losses/contract/."""
import pytest
import torch

import fastcontrast
from fastcontrast import backends
from fastcontrast.reference import clip_loss_reference

from .._helpers import (FUSED_BACKENDS, as_float64, assert_close, backend_usable, device_for,
                       interpreting_triton, make_inputs)
from ._cases import DTYPES, D, N, log_parameter_grad, q_k, raises_clear_error


def _skip_unsupported(backend, n, dtype):
    if not backend_usable(backend, device_for(backend)):
        pytest.skip(f"backend {backend!r} unavailable here")
    if backend == "triton" and dtype not in backends.PROPERTIES["triton"].compute_dtypes:
        pytest.skip(f"triton kernels do not take {dtype}")
    if interpreting_triton(backend) and dtype == torch.bfloat16 and n > 7:
        pytest.skip("bf16 in the interpreter is emulated slowly; small shape only")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n,d", [(1, 3), (23, 12), (257, 64)], ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_clip_loss_matches_reference(backend, n, d, dtype):
    _skip_unsupported(backend, n, dtype)
    device = device_for(backend)
    image, text, _ = make_inputs(n, n, d, dtype, device, scale=d ** -0.5)
    scale = torch.tensor(14.0, device=device, requires_grad=True)
    bias = torch.tensor(-3.0, device=device, requires_grad=True)
    loss = fastcontrast.clip_loss(image, text, scale, logit_bias=bias, backend=backend)
    grads = torch.autograd.grad(loss, [image, text, scale, bias])
    inputs64 = as_float64(image, text, scale, bias)
    ref = clip_loss_reference(*inputs64[:3], logit_bias=inputs64[3])
    ref_grads = torch.autograd.grad(ref, inputs64)
    # The same reference in the test dtype (on the CPU) is the error baseline.
    inputs_lp = [t.detach().cpu().requires_grad_() for t in (image, text, scale, bias)]
    base = clip_loss_reference(*inputs_lp[:3], logit_bias=inputs_lp[3])
    base_grads = torch.autograd.grad(base, inputs_lp)
    with torch.no_grad():
        max_logit = 14.0 * float((inputs64[0] @ inputs64[1].T).abs().max())
    assert loss.dtype == dtype
    assert_close(loss, ref, dtype, "clip loss", max_logit=max_logit, baseline=base)
    for name, g, r, b in zip(("image", "text", "logit_scale", "logit_bias"), grads, ref_grads,
                             base_grads):
        assert_close(g, r, dtype, f"clip d{name}", max_logit=max_logit, baseline=b)


# ---------------------------------------------------------------------------------------------
# The ClipLoss module


def test_clip_loss_module_clamps_logit_scale_like_openclip():
    module = fastcontrast.ClipLoss(init_logit_scale=500.0, backend="torch")
    assert float(module.logit_scale.detach()) == 100.0
    image, text = torch.randn(7, 6), torch.randn(7, 6)
    loss = module(image, text)
    expected = clip_loss_reference(image.double(), text.double(), 100.0)
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    loss.backward()
    assert module.log_logit_scale.grad == 0  # clamped: no gradient, as in OpenCLIP


def test_clip_loss_module_learns_scale_and_round_trips_state():
    module = fastcontrast.ClipLoss(init_logit_scale=10.0, backend="torch")
    image, text = torch.randn(9, 4), torch.randn(9, 4)
    module(image, text).backward()
    expected = log_parameter_grad(
        lambda scale: clip_loss_reference(image.double(), text.double(), scale), 10.0)
    assert expected.abs() > 1e-3  # the scale matters here
    torch.testing.assert_close(module.log_logit_scale.grad.double(), expected, rtol=1e-4,
                               atol=1e-6)
    frozen = fastcontrast.ClipLoss(init_logit_scale=3.0, learnable=False)
    frozen.load_state_dict(module.state_dict())
    assert torch.equal(frozen.log_logit_scale, module.log_logit_scale.detach())
    assert list(frozen.parameters()) == []


# ---------------------------------------------------------------------------------------------
# Bad input


BAD_CALLS = {
    "clip_shape_mismatch": (lambda: fastcontrast.clip_loss(
        torch.randn(N, D), torch.randn(N + 1, D), 10.0), ValueError,
        r"text must have the shape of image \(6, 4\) .*, got \(7, 4\)"),
    "clip_scale_negative": (lambda: fastcontrast.clip_loss(*q_k(), -1.0), ValueError,
                            r"logit_scale must be positive and finite, got -1.0"),
    "clip_image_not_tensor": (lambda: fastcontrast.clip_loss(None, q_k()[1], 10.0), TypeError,
                              r"image must be a torch.Tensor, got NoneType"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_clear_error(name):
    raises_clear_error(BAD_CALLS[name])
