"""CPC (fastcontrast.methods.cpc): shapes, the loss against an explicit float64 oracle and the
reference backend, accuracy per step, determinism, a few training steps, bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastcontrast
from fastcontrast.methods import cpc
from fastcontrast.methods.data import SyntheticSpeakers

TINY = dict(latent_dim=3, context_dim=5, encoder_width=4, prediction_steps=2)


def tiny(dtype=torch.float64, **overrides):
    return cpc.build(**{**TINY, **overrides}).to(dtype)


def sequences(b, t, dtype=torch.float64, scale=1.0):
    return (torch.randn(b, 1, t, dtype=torch.float64) * scale).to(dtype)


def explicit_loss(model, x):
    """The CPC objective written out per (b, t, k) with materialised scores, float64:
    mean_k mean_{b, t < L-k} [logsumexp_j s_j - s_{b L + t + k}], s_j = <W_k c_bt, z_j> / tau,
    plus the arg-max accuracy per k."""
    z, c = model.latents_and_context(x)
    b, length, _ = z.shape
    keys = z.reshape(b * length, -1)
    if model.normalize:
        keys = F.normalize(keys, dim=1)
    losses, accuracies = [], []
    for k, predictor in enumerate(model.predictors, start=1):
        terms, hits = [], 0
        for i in range(b):
            for t in range(length - k):
                q = predictor(c[i, t])
                if model.normalize:
                    q = F.normalize(q, dim=0)
                s = keys @ q / model.temperature
                positive = i * length + t + k
                terms.append(torch.logsumexp(s, 0) - s[positive])
                hits += int(s.argmax() == positive)
        losses.append(torch.stack(terms).mean())
        accuracies.append(hits / len(terms))
    return torch.stack(losses).mean(), accuracies


def per_backend(model, x):
    """{backend: (loss's dict, parameter gradients)} for the fused ("auto") and the reference
    backend on the same model and batch."""
    results = {}
    for backend in ("auto", "reference"):
        model.backend = backend
        model.zero_grad()
        out = model.loss(x)
        out["loss"].backward()
        results[backend] = (out, [p.grad.clone() for p in model.parameters()])
    return results


def assert_grads_close(results, **tolerances):
    for fused, reference in zip(results["auto"][1], results["reference"][1]):
        assert torch.isfinite(fused).all()
        torch.testing.assert_close(fused, reference, **tolerances)


def test_shapes_and_diagnostics():
    model = tiny()
    x = sequences(3, 16 * 7)
    z, c = model.latents_and_context(x)
    assert z.shape == (3, 7, 3) and c.shape == (3, 7, 5)
    assert model.features(x).shape == (3, 5)
    out = model.loss(x)
    assert out["loss"].dim() == 0 and out["loss"].requires_grad
    assert set(out) == {"loss", "mi_bound", "loss_k1", "loss_k2", "mi_bound_k1", "mi_bound_k2",
                        "accuracy_k1", "accuracy_k2"}
    n = 3 * 7
    loss = float(out["loss"].detach())
    assert float(out["mi_bound"]) == pytest.approx(math.log(n) - loss)
    assert loss == pytest.approx((float(out["loss_k1"]) + float(out["loss_k2"])) / 2)
    for k in (1, 2):
        assert 0.0 <= float(out[f"accuracy_k{k}"]) <= 1.0
        assert float(out[f"mi_bound_k{k}"]) <= math.log(n) + 1e-12


@pytest.mark.parametrize("b, t, normalize, temperature, scale", [
    (1, 16 * 3, False, 1.0, 1.0),     # one sequence: the negatives are its other time steps
    (2, 16 * 5, True, 0.05, 1.0),
    (3, 16 * 4, False, 0.01, 30.0),   # tiny temperature, large inputs: logits in the hundreds
])
def test_loss_matches_explicit_oracle_and_reference(b, t, normalize, temperature, scale):
    model = tiny(normalize=normalize, temperature=temperature)
    x = sequences(b, t, scale=scale)
    expected, accuracies = explicit_loss(model, x)
    results = per_backend(model, x)
    for out, _ in results.values():
        torch.testing.assert_close(out["loss"].detach(), expected.detach(), rtol=1e-10,
                                   atol=1e-10)
        for k, accuracy in enumerate(accuracies, start=1):
            assert float(out[f"accuracy_k{k}"]) == pytest.approx(accuracy)
    assert_grads_close(results, rtol=1e-9, atol=1e-11)


def test_float32_loss_and_gradients_match_reference_backend():
    model = cpc.build(prediction_steps=3).float()
    x = sequences(4, 16 * 9, torch.float32)
    results = per_backend(model, x)
    torch.testing.assert_close(results["auto"][0]["loss"].detach(),
                               results["reference"][0]["loss"].detach(), rtol=2e-6, atol=2e-6)
    assert_grads_close(results, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_close_to_float64_truth(dtype):
    """In fp16/bf16 the fused loss is as close to the float64 truth (the same rounded weights
    and inputs in float64) as the reference backend run in the same dtype, and its gradients are
    finite."""
    model = cpc.build(prediction_steps=3, latent_dim=16, context_dim=16, encoder_width=8)
    x = sequences(4, 16 * 8, torch.float32)
    try:
        model.to(dtype).loss(x.to(dtype))
    except RuntimeError as exc:                         # a CPU kernel without this dtype
        pytest.skip(f"{dtype} encoder / GRU not supported here: {exc}")
    truth_model = cpc.build(prediction_steps=3, latent_dim=16, context_dim=16,
                            encoder_width=8).double()
    truth_model.load_state_dict(model.state_dict())
    truth = float(truth_model.loss(x.to(dtype).double())["loss"].detach())
    results = per_backend(model, x.to(dtype))
    errors = {backend: abs(float(out["loss"].detach()) - truth)
              for backend, (out, _) in results.items()}
    for grad in results["auto"][1]:
        assert torch.isfinite(grad).all()
    assert errors["auto"] <= 2 * errors["reference"] + 4 * torch.finfo(dtype).eps * abs(truth)


def test_gradcheck_through_fused_loss():
    model = tiny(prediction_steps=1)
    x = sequences(2, 16 * 3).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: model.loss(inp)["loss"], (x,))


def test_chunked_accuracy_equals_full_argmax():
    queries, keys = torch.randn(37, 4, dtype=torch.float64), torch.randn(50, 4, dtype=torch.float64)
    targets = torch.randint(0, 50, (37,))
    targets[:10] = (queries[:10] @ keys.T).argmax(1)   # some hits for sure
    for normalize in (False, True):
        k = F.normalize(keys, dim=1) if normalize else keys
        expected = float(((queries @ k.T).argmax(1) == targets).double().mean())
        for chunk in (1, 7, 37, 100):
            assert cpc._chunked_accuracy(queries, keys, targets, normalize, chunk) == expected


def test_views_from_dataset():
    data = SyntheticSpeakers(3, n_per_speaker=2, length=64, n_frequencies=4, per_speaker=2)
    model = tiny(torch.float32)
    batch = model.views(data, torch.tensor([4, 0, 5]), torch.Generator().manual_seed(0))
    assert batch.shape == (3, 1, 64) and batch.dtype == torch.float32
    torch.testing.assert_close(batch[0], data[4][0])
    assert torch.isfinite(model.loss(batch)["loss"])


def _train(backend, steps, seed=0):
    torch.manual_seed(seed)
    data = SyntheticSpeakers(4, n_per_speaker=4, length=128, n_frequencies=5, per_speaker=2)
    model = cpc.build(backend=backend, latent_dim=16, context_dim=16, encoder_width=16,
                      prediction_steps=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(steps):
        batch = model.views(data, torch.randperm(len(data), generator=generator)[:8], generator)
        out = model.loss(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        model.after_step()
        curve.append(float(out["loss"].detach()))
    return curve


def test_loss_decreases_deterministic_and_same_curve_as_reference():
    fused = _train("auto", 12)
    assert fused == _train("auto", 12)                      # same seed, same curve, bit for bit
    assert sum(fused[-3:]) / 3 < fused[0] - 0.1             # it learns
    reference = _train("reference", 12)
    torch.testing.assert_close(torch.tensor(fused), torch.tensor(reference), rtol=1e-4, atol=1e-4)
    assert fused != _train("auto", 12, seed=1)


@pytest.mark.parametrize("x, error, match", [
    ("not a tensor", TypeError, "sequences must be a torch.Tensor"),
    (torch.zeros(2, 1, 48, dtype=torch.int64), TypeError, "floating-point dtype"),
    (torch.zeros(2, 48, dtype=torch.float64), ValueError, r"\(B >= 1, 1, T\).*got shape \(2, 48\)"),
    (torch.zeros(2, 2, 48, dtype=torch.float64), ValueError, r"got shape \(2, 2, 48\)"),
    (torch.zeros(2, 1, 50, dtype=torch.float64), ValueError, "multiple of 16"),
    (torch.zeros(2, 1, 32, dtype=torch.float64), ValueError, r"T >= 48"),
    (torch.zeros(0, 1, 48, dtype=torch.float64), ValueError, r"got shape \(0, 1, 48\)"),
    (torch.zeros(2, 1, 48, dtype=torch.float32), TypeError, "dtype and device of the model"),
])
def test_bad_sequences(x, error, match):
    model = tiny()
    with pytest.raises(error, match=match):
        model.loss(x)
    with pytest.raises(error, match=match):
        model.features(x)


@pytest.mark.parametrize("overrides, error, match", [
    (dict(foo=1), ValueError, r"unknown CPC settings \['foo'\]"),
    (dict(prediction_steps=0), ValueError, "prediction_steps must be >= 1"),
    (dict(latent_dim=2.5), TypeError, "latent_dim must be an int"),
    (dict(temperature=0.0), ValueError, "temperature must be positive"),
    (dict(normalize=1), TypeError, "normalize must be a bool"),
    (dict(backend="nope"), ValueError, "backend must be one of"),
])
def test_bad_settings(overrides, error, match):
    with pytest.raises(error, match=match):
        cpc.build(**overrides)


def test_registry_and_defaults():
    from fastcontrast.methods import method_module

    assert method_module("cpc") is cpc
    assert cpc.DEFAULTS["data"] == "speakers" and cpc.DEFAULTS["seconds"] <= 300
    model = cpc.build(batch_size=8, lr=1e-3, seconds=10, data="speakers")   # trainer keys pass
    assert isinstance(model, fastcontrast.methods.ContrastiveMethod)
    assert model.prediction_steps == cpc.DEFAULTS["prediction_steps"]
