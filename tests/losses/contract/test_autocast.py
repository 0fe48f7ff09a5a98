"""Under torch.autocast the losses are float32 ops, as F.cross_entropy: the value comes back in
float32 and is not rounded to the autocast dtype.

The inputs are float16 / bfloat16 (a model's outputs under autocast); the truth is the float64
reference on those same values. The fused kernels accumulate in float32, so the only error left
is float32 round-off: a relative 1e-5 bound, where a value rounded to bfloat16 is off by up to
2^-9 (2e-3) and to float16 by up to 2^-12 (2.4e-4). F.cross_entropy on the logits materialised
under the same autocast (rounded to the autocast dtype by the matmul) is the comparison the
README makes; the fused loss must not be less accurate than it.
"""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc
from fastcontrast import backends

BACKENDS = [b for b in ("cpu", "torch") if b in backends.available_backends("cpu")]
DTYPES = [torch.bfloat16, torch.float16]
N, D = 96, 24
TEMPERATURE = 0.07


def _labels():
    return torch.arange(N) % 5


CASES = {
    "info_nce": lambda x, y, b: fc.info_nce(x, y, temperature=TEMPERATURE, backend=b),
    "info_nce_dcl": lambda x, y, b: fc.info_nce(x, y, decoupled=True, backend=b),
    "clip_loss": lambda x, y, b: fc.clip_loss(x, y, 30.0, backend=b),
    "nt_xent": lambda x, y, b: fc.nt_xent(x, y, temperature=0.1, backend=b),
    "nt_xent_hcl": lambda x, y, b: fc.nt_xent(x, y, hcl_beta=1.0, hcl_tau_plus=0.1, backend=b),
    "supcon": lambda x, y, b: fc.supcon(x, _labels(), backend=b),
    "moco_loss": lambda x, y, b: fc.moco_loss(x, y, y.flip(0), backend=b),
    "siglip_loss": lambda x, y, b: fc.siglip_loss(x, y, 10.0, -10.0, backend=b),
    "InfoNCELoss": lambda x, y, b: fc.InfoNCELoss(backend=b)(x, y),
    "SupConLoss_none": lambda x, y, b: fc.SupConLoss(reduction="none", backend=b)(x, _labels()),
}


def _inputs(dtype):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(N, D, generator=generator).to(dtype) for _ in range(2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_under_autocast_is_float32_accurate(backend, name, dtype):
    x, y = _inputs(dtype)
    truth = CASES[name](x.double(), y.double(), "reference")
    with torch.autocast("cpu", dtype=dtype):
        loss = CASES[name](x, y, backend)
    assert loss.dtype == torch.float32
    error = (loss.double() - truth).abs().max()
    assert error <= 1e-5 * truth.abs().max().clamp_min(1), f"error {error:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_under_autocast_at_least_as_accurate_as_cross_entropy(backend, dtype):
    x, y = _inputs(dtype)
    truth = CASES["info_nce"](x.double(), y.double(), "reference")
    with torch.autocast("cpu", dtype=dtype):
        loss = CASES["info_nce"](x, y, backend)
        logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T / TEMPERATURE
        cross_entropy = F.cross_entropy(logits, torch.arange(N))
    assert cross_entropy.dtype == loss.dtype == torch.float32
    assert (loss.double() - truth).abs() <= (cross_entropy.double() - truth).abs()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_without_autocast_keeps_the_input_dtype(backend):
    x, y = _inputs(torch.bfloat16)
    for name, call in CASES.items():
        assert call(x, y, backend).dtype == torch.bfloat16, name
