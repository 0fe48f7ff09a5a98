"""SimCLR (fastcontrast.methods.simclr): the loss against the reference backend and a float64
NT-Xent written out, extreme temperatures, views, bad input (training runs, determinism and
the same-curve check: tests/methods/test_methods_trainer.py)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastcontrast.methods import simclr
from fastcontrast.methods.data import ClutteredDigits

TINY = {"width": 4, "feature_dim": 16, "projection_dim": 8}


@pytest.fixture(scope="module")
def digits():
    return ClutteredDigits("train")


def _pair(backend_a="auto", backend_b="reference", **overrides):
    a = simclr.build(backend=backend_a, **{**TINY, **overrides})
    b = simclr.build(backend=backend_b, **{**TINY, **overrides})
    b.load_state_dict(a.state_dict())
    return a, b


def _batch(method, dataset, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return method.views(dataset, torch.randperm(len(dataset), generator=g)[:n], g)


@pytest.mark.parametrize("n", [2, 7, 33])
def test_loss_and_grads_match_reference_backend(digits, n):
    fused, ref = _pair()
    batch = _batch(fused, digits, n)
    out_f, out_r = fused.loss(batch), ref.loss(batch)
    out_f["loss"].backward()
    out_r["loss"].backward()
    torch.testing.assert_close(out_f["loss"], out_r["loss"], rtol=1e-5, atol=1e-5)
    # absolute tolerance on the scale of the largest gradient: conv biases in front of a
    # BatchNorm have a true gradient of 0 and only carry rounding noise
    scale = max(float(q.grad.abs().max()) for q in ref.parameters())
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert out_f["mi_bound"] == pytest.approx(math.log(2 * n - 1) - float(out_f["loss"].detach()),
                                              abs=1e-6)


def test_loss_equals_nt_xent_written_out_in_float64(digits):
    """The method's loss (fused kernels, float64) against NT-Xent on explicit logits."""
    method = simclr.build(**TINY).double()
    batch = {k: v.double() for k, v in _batch(method, digits, 9).items()}
    out = method.loss(batch)
    n = batch["view_a"].shape[0]
    z = F.normalize(method.head(method.encoder(torch.cat([batch["view_a"],
                                                          batch["view_b"]]))), dim=1)
    logits = z @ z.T / simclr.DEFAULTS["temperature"]
    logits.fill_diagonal_(-math.inf)
    positive = (torch.arange(2 * n) + n) % (2 * n)
    expected = F.cross_entropy(logits, positive)
    torch.testing.assert_close(out["loss"], expected, rtol=1e-10, atol=1e-10)


def test_large_temperature_and_tiny_temperature_stay_finite(digits):
    for tau in (1e-3, 10.0):
        fused, ref = _pair(temperature=tau)
        batch = _batch(fused, digits, 16)
        a, b = fused.loss(batch)["loss"], ref.loss(batch)["loss"]
        assert torch.isfinite(a)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_views_shapes_and_features(digits):
    method = simclr.build(**TINY)
    batch = _batch(method, digits, 5)
    assert set(batch) == {"view_a", "view_b"}
    assert batch["view_a"].shape == batch["view_b"].shape == (5, 1, 24, 24)
    assert not torch.equal(batch["view_a"], batch["view_b"])  # independent renderings
    assert batch["view_a"].min() >= 0 and batch["view_a"].max() <= 1
    assert method.features(batch["view_a"]).shape == (5, TINY["feature_dim"])


def test_views_are_deterministic_for_a_generator(digits):
    method = simclr.build(**TINY)
    a, b = _batch(method, digits, 6, seed=3), _batch(method, digits, 6, seed=3)
    c = _batch(method, digits, 6, seed=4)
    assert torch.equal(a["view_a"], b["view_a"]) and torch.equal(a["view_b"], b["view_b"])
    assert not torch.equal(a["view_a"], c["view_a"])


def test_bad_input(digits):
    method = simclr.build(**TINY)
    batch = _batch(method, digits, 4)
    with pytest.raises(ValueError, match="missing"):
        method.loss({"view_a": batch["view_a"]})
    with pytest.raises(ValueError, match="view_b"):
        method.loss({"view_a": batch["view_a"], "view_b": batch["view_b"][:3]})
    with pytest.raises(ValueError, match="view_b"):
        method.loss({"view_a": batch["view_a"], "view_b": batch["view_b"].double()})
    with pytest.raises(ValueError, match="at least 2"):
        method.loss({"view_a": batch["view_a"][:1], "view_b": batch["view_b"][:1]})
    with pytest.raises(TypeError, match="batch must be a dict"):
        method.loss(batch["view_a"])
    with pytest.raises(ValueError, match="unknown SimCLR settings"):
        simclr.build(temprature=0.1)
    with pytest.raises(ValueError, match="temperature"):
        simclr.build(temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        simclr.build(backend="fast")
    with pytest.raises(TypeError, match="two_views"):
        method.views([1, 2, 3], torch.arange(2), None)
