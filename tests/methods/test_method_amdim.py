"""AMDIM (fastcontrast.methods.amdim): the clipped NCE against a float64 loop, the unclipped
fused path against the reference backend and against the clipped formula as c -> infinity,
gradients, the first training steps, determinism and bad input."""
import math

import pytest
import torch

from fastcontrast.methods import amdim

from .test_method_dim import (FUSED, assert_deterministic,  # noqa: F401 (fixtures)
                              assert_loss_decreases, assert_same_gradients, one_thread,
                              tiny_digits, train_losses, twin)

TINY = {"width": 8, "out_dim": 16, "head_dim": 8}
SHAPES = [(2, 3, 1), (3, 1, 4), (5, 17, 6), (4, 5, 36)]   # (B, d, P)


def clipped_nce64(source, target, clip, scale):
    """Float64 loop over (i, p): -log( e^{c_ii^p} / (e^{c_ii^p} + sum_{j != i, q} e^{c_ij^q}) )
    with c = clip tanh(scale <u_i, v_jq> / clip) (no clipping when clip is None)."""
    source, target = source.double(), target.double()
    b, _, p = target.shape

    def score(i, j, q):
        s = scale * float(source[i] @ target[j, :, q])
        return s if clip is None else clip * math.tanh(s / clip)

    total = 0.0
    for i in range(b):
        negatives = [score(i, j, q) for j in range(b) if j != i for q in range(p)]
        for q in range(p):
            positive = score(i, i, q)
            candidates = torch.tensor([positive] + negatives, dtype=torch.float64)
            total += float(torch.logsumexp(candidates, 0)) - positive
    return total / (b * p)


def raw_square_mean(source, target, scale):
    return float((torch.einsum("id,jdp->ijp", source.double(), target.double()) * scale)
                 .pow(2).mean())


@pytest.mark.parametrize("b,d,p", SHAPES)
@pytest.mark.parametrize("clip,scale", [(10.0, 1.0), (1.0, 10.0), (0.5, 0.3)])
def test_clipped_nce_matches_float64_loop(b, d, p, clip, scale):
    source, target = torch.randn(b, d) * 3, torch.randn(b, d, p) * 3   # clipping is active
    loss, square = amdim.clipped_nce(source, target, clip, scale)
    assert float(loss) == pytest.approx(clipped_nce64(source, target, clip, scale), rel=1e-5)
    assert float(square) == pytest.approx(raw_square_mean(source, target, scale), rel=1e-5)


@pytest.mark.parametrize("backend", FUSED + ["reference"])
@pytest.mark.parametrize("b,d,p", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unclipped_fused_nce_matches_float64_loop(backend, b, d, p, dtype):
    source, target = torch.randn(b, d, dtype=dtype), torch.randn(b, d, p, dtype=dtype)
    loss, square = amdim.fused_nce(source, target, 2.0, backend)
    rel = 1e-5 if dtype == torch.float32 else 1e-10
    assert float(loss) == pytest.approx(clipped_nce64(source, target, None, 2.0), rel=rel)
    assert float(square) == pytest.approx(raw_square_mean(source, target, 2.0), rel=rel)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype,rel", [(torch.float16, 2e-2), (torch.bfloat16, 6e-2)])
def test_low_precision_inputs(backend, dtype, rel):
    source, target = torch.randn(5, 16), torch.randn(5, 16, 9)
    expected = clipped_nce64(source, target, None, 0.5)
    low = (source.to(dtype), target.to(dtype))
    loss, _ = amdim.fused_nce(*low, 0.5, backend)
    assert loss.dtype == dtype and float(loss) == pytest.approx(expected, rel=rel)
    loss, _ = amdim.clipped_nce(*low, 4.0, 0.5)
    assert float(loss) == pytest.approx(clipped_nce64(source, target, 4.0, 0.5), rel=rel)


@pytest.mark.parametrize("backend", FUSED)
def test_unclipped_gradients_equal_the_clipped_form_as_clip_grows(backend):
    source = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    target = torch.randn(6, 5, 7, dtype=torch.float64, requires_grad=True)
    fused = sum(amdim.fused_nce(source, target, 0.7, backend))
    clipped = sum(amdim.clipped_nce(source, target, 1e9, 0.7))
    torch.testing.assert_close(fused, clipped, rtol=1e-9, atol=1e-12)
    for a, b in zip(torch.autograd.grad(fused, (source, target)),
                    torch.autograd.grad(clipped, (source, target))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_gradcheck_float64(backend):
    source = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: sum(amdim.clipped_nce(s, t, 2.0, 1.5)),
                                    (source, target))
    # nondet_tol: the cpu backend forms its gradient in the forward pass (first backward) and
    # recomputes it on a re-entrant call, which differs in the last bits
    assert torch.autograd.gradcheck(lambda s, t: sum(amdim.fused_nce(s, t, 1.5, backend)),
                                    (source, target), nondet_tol=1e-12)


def test_large_scores_stay_finite():
    source, target = torch.randn(4, 8) * 1e3, torch.randn(4, 8, 9) * 1e3
    for loss in (amdim.clipped_nce(source, target, 10.0, 1.0)[0],
                 amdim.fused_nce(source, target, 100.0, "reference")[0]):
        assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("options", [{}, {"clip": None}, {"temperature": None},
                                     {"pairs": ("5-5", "1-1"), "fresh_renderings": False}])
def test_loss_and_gradients_equal_reference_backend(tiny_digits, backend, options):
    fused, reference = twin(amdim.build, backend, **TINY, **options)
    batch = fused.views(tiny_digits, torch.arange(7), torch.Generator().manual_seed(2))
    out_f, out_r = fused.loss(batch), reference.loss(batch)
    for key in ("loss", "mi_bound", "nce", "penalty"):
        torch.testing.assert_close(out_f[key], out_r[key], rtol=1e-5, atol=1e-5, msg=key)
    out_f["loss"].backward()
    out_r["loss"].backward()
    assert_same_gradients(fused, reference)


@pytest.mark.parametrize("backend", FUSED)
def test_first_training_steps_equal_reference_backend(tiny_digits, backend):
    fused, reference = twin(amdim.build, backend, clip=None, **TINY)
    curve_f = train_losses(fused, tiny_digits, steps=4)
    curve_r = train_losses(reference, tiny_digits, steps=4)
    assert curve_f == pytest.approx(curve_r, rel=1e-4)


@pytest.mark.parametrize("clip", [10.0, None])
def test_loss_decreases_on_a_fixed_batch(tiny_digits, clip):
    torch.manual_seed(1)
    method = amdim.build(clip=clip, **TINY)
    assert_loss_decreases(method, tiny_digits, 0.1)


def test_shapes_and_determinism(tiny_digits):
    method = assert_deterministic(amdim.build, tiny_digits, **TINY)
    batch = method.views(tiny_digits, torch.arange(4), torch.Generator().manual_seed(0))
    assert batch["view_a"].shape == batch["view_b"].shape == (4, 1, 24, 24)
    assert batch["source_position"].shape == (2, 4)
    scales = method._scales(batch["view_a"])
    assert scales["1"].shape == (4, 8) and scales["5"].shape == scales["7"].shape == (4, 8, 36)
    assert torch.allclose(scales["5"].norm(dim=1), torch.ones(4, 36))
    assert method.features(batch["view_a"]).shape == (4, 16)
    local_pairs = amdim.build(pairs=("1-5", "5-5"), **TINY)   # every term has 1 + 3 * 36
    out = local_pairs.loss(batch)
    assert float(out["mi_bound"]) == pytest.approx(
        math.log(1 + 3 * 36) - float(out["nce"]) / 4, rel=1e-5)


def test_bad_input_is_rejected(tiny_digits):
    method = amdim.build(**TINY)
    good = torch.rand(4, 1, 24, 24)
    with pytest.raises(TypeError, match="'view_a' and 'view_b'"):
        method.loss(good)
    with pytest.raises(ValueError, match=r"got shape \(4, 2, 24, 24\)"):
        method.loss({"view_a": torch.rand(4, 2, 24, 24), "view_b": good})
    with pytest.raises(ValueError, match=r"view_b must have the shape of view_a \(4, 1, 24, 24\)"):
        method.loss({"view_a": good, "view_b": good[:, :, :20]})
    with pytest.raises(ValueError, match="clip must be positive"):
        amdim.build(clip=-1.0)
    with pytest.raises(ValueError, match="penalty must be a float >= 0"):
        amdim.build(penalty=-0.1)
    with pytest.raises(ValueError, match="pairs must be a non-empty subset"):
        amdim.build(pairs=("1-9",))
    with pytest.raises(ValueError, match="crop_scale"):
        amdim.build(crop_scale=(0.0, 1.0))
    with pytest.raises(TypeError, match="fresh_renderings must be a bool"):
        amdim.build(fresh_renderings=1)
    with pytest.raises(ValueError, match="unknown AMDIM settings"):
        amdim.build(clip_value=3)
