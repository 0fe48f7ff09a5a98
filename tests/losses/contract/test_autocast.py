"""Under torch.autocast the losses are float32 ops, as F.cross_entropy: the value comes back in
float32 and is not rounded to the autocast dtype.

The inputs are float16 / bfloat16 (a model's outputs under autocast); the truth is the float64
reference on those same values. The fused kernels accumulate in float32, so the only error left
is float32 round-off: a relative 1e-5 bound, where a value rounded to bfloat16 is off by up to
2^-9 (2e-3) and to float16 by up to 2^-12 (2.4e-4). F.cross_entropy on the logits materialised
under the same autocast (rounded to the autocast dtype by the matmul) is the comparison the
README makes; the fused loss must not be less accurate than it.

On every backend (triton too where it runs), the loss of each registered loss under autocast is
float32, and float32 inputs are not downcast.
"""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc
from fastcontrast import backends

from ..._helpers import device_for
from .._cases import ALL_BACKENDS, CASES, inputs, reference, require_every_loss, run

BACKENDS = [b for b in ("cpu", "torch") if b in backends.available_backends("cpu")]
DTYPES = [torch.bfloat16, torch.float16]
N, D = 96, 24
TEMPERATURE = 0.07


def _labels():
    return torch.arange(N) % 5


CALLS = {
    "info_nce": lambda x, y, b: fc.info_nce(x, y, temperature=TEMPERATURE, backend=b),
    "info_nce_dcl": lambda x, y, b: fc.info_nce(x, y, decoupled=True, backend=b),
    "clip_loss": lambda x, y, b: fc.clip_loss(x, y, 30.0, backend=b),
    "nt_xent": lambda x, y, b: fc.nt_xent(x, y, temperature=0.1, backend=b),
    "nt_xent_hcl": lambda x, y, b: fc.nt_xent(x, y, hcl_beta=1.0, hcl_tau_plus=0.1, backend=b),
    "supcon": lambda x, y, b: fc.supcon(x, _labels(), backend=b),
    "moco_loss": lambda x, y, b: fc.moco_loss(x, y, y.flip(0), backend=b),
    "siglip_loss": lambda x, y, b: fc.siglip_loss(x, y, 10.0, -10.0, backend=b),
    "distill_info_nce": lambda x, y, b: fc.distill_info_nce(
        x, y, y.flip(0), x.flip(0), temperature=0.1, teacher_temperature=0.05, backend=b),
    "distill_clip_loss": lambda x, y, b: sum(fc.distill_clip_loss(
        x, y, y.flip(0), x.flip(0), 10.0, 20.0, backend=b)),
    "InfoNCELoss": lambda x, y, b: fc.InfoNCELoss(backend=b)(x, y),
    "SupConLoss_none": lambda x, y, b: fc.SupConLoss(reduction="none", backend=b)(x, _labels()),
}
require_every_loss(CALLS, "autocast")


def _inputs(dtype):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(N, D, generator=generator).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_under_autocast_is_float32_accurate(backend, name, dtype):
    x, y = _inputs(dtype)
    truth = CALLS[name](x.double(), y.double(), "reference")
    with torch.autocast("cpu", dtype=dtype):
        loss = CALLS[name](x, y, backend)
    assert loss.dtype == torch.float32
    error = (loss.double() - truth).abs().max()
    assert error <= 1e-5 * truth.abs().max().clamp_min(1), f"error {error:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_under_autocast_at_least_as_accurate_as_cross_entropy(backend, dtype):
    x, y = _inputs(dtype)
    truth = CALLS["info_nce"](x.double(), y.double(), "reference")
    with torch.autocast("cpu", dtype=dtype):
        loss = CALLS["info_nce"](x, y, backend)
        logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T / TEMPERATURE
        cross_entropy = F.cross_entropy(logits, torch.arange(N))
    assert cross_entropy.dtype == loss.dtype == torch.float32
    assert (loss.double() - truth).abs() <= (cross_entropy.double() - truth).abs()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_without_autocast_keeps_the_input_dtype(backend):
    x, y = _inputs(torch.bfloat16)
    for name, call in CALLS.items():
        assert call(x, y, backend).dtype == torch.bfloat16, name


# ---------------------------------------------------------------------------------------------
# Every backend (triton too where it runs): an fp32 loss; fp32 inputs are not downcast


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_autocast_keeps_fp32(backend, name):
    device = device_for(backend)
    features = inputs(name, 6, 5, torch.float32, device)
    expected = run(name, features, backend)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = run(name, features, backend)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_autocast_bf16_inputs_give_an_fp32_loss(backend, name):
    device = device_for(backend)
    features = inputs(name, 6, 5, torch.bfloat16, device)
    expected = reference(name, features)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        loss = run(name, features, backend)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, rtol=1e-2, atol=1e-2)

