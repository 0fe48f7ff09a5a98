"""Deep InfoMax (fastcontrast.methods.dim): estimators against float64 formulas, the fused loss
against backend="reference", the first training steps, determinism and bad input.

``train_losses`` / ``tiny_digits`` are shared with the AMDIM and CMC tests."""
import math

import pytest
import torch

import fastcontrast
from fastcontrast.methods import dim
from fastcontrast.methods.data import ClutteredDigits

FUSED = [b for b in ("cpu", "torch") if b in fastcontrast.available_backends("cpu")]
TINY = {"width": 8, "out_dim": 16, "head_dim": 8}


@pytest.fixture(scope="module")
def tiny_digits():
    return ClutteredDigits("train")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest (and steady on a shared machine); restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_losses(method, dataset, *, steps=3, batch=8, seed=0, lr=1e-3, fixed_batch=False):
    """Loss of each of ``steps`` Adam steps on batches drawn with a generator seeded by
    ``seed`` (the same batch every step when ``fixed_batch``)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(method.parameters(), lr=lr)
    losses, views = [], None
    for _ in range(steps):
        if views is None or not fixed_batch:
            indices = torch.randperm(len(dataset), generator=generator)[:batch]
            views = method.views(dataset, indices, generator)
        out = method.loss(views)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        method.after_step()
        losses.append(float(out["loss"].detach()))
    return losses


def assert_loss_decreases(method, dataset, margin):
    """12 Adam steps on one fixed batch of 12: the mean of the last 3 losses is at least
    ``margin`` below the mean of the first 3."""
    losses = train_losses(method, dataset, steps=12, batch=12, lr=1e-2, fixed_batch=True)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - margin, losses


def assert_deterministic(build, dataset, **kwargs):
    """Two ``build(**kwargs)`` after the same torch seed give the same 2-step curve with the
    same batch seed; returns the second method."""
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        method = build(**kwargs)
        runs.append(train_losses(method, dataset, steps=2, seed=7))
    assert runs[0] == runs[1]
    return method


def twin(build, backend, **kwargs):
    """(method with ``backend``, the same weights with backend="reference")."""
    torch.manual_seed(0)
    fused = build(backend=backend, **kwargs)
    reference = build(backend="reference", **kwargs)
    reference.load_state_dict(fused.state_dict())
    return fused, reference


def assert_same_gradients(fused, reference):
    """Parameter gradients equal up to 1e-4 of the largest reference gradient (conv biases in
    front of BatchNorm have an exact gradient of 0 and carry only rounding noise)."""
    scale = max(float(p.grad.abs().max()) for p in reference.parameters() if p.grad is not None)
    for (name, a), b in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4 * scale, msg=name)


def local_infonce64(local, glob, temperature):
    """Float64 loop: mean over local rows r of -log softmax_j(cos(l_r, g_j) / tau)[image(r)]."""
    local, glob = local.double(), glob.double()
    b, p = glob.shape[0], local.shape[0] // glob.shape[0]
    total = 0.0
    for r in range(local.shape[0]):
        scores = torch.stack([torch.nn.functional.cosine_similarity(local[r], glob[j], dim=0)
                              for j in range(b)]) / temperature
        total += float(torch.logsumexp(scores, 0) - scores[r // p])
    return total / local.shape[0]


@pytest.mark.parametrize("b,p,d", [(2, 1, 3), (5, 7, 4), (3, 36, 17)])
def test_local_infonce_term_matches_float64_loop(b, p, d):
    method = dim.build(backend="reference", **TINY)
    local, glob = torch.randn(b * p, d), torch.randn(b, d) * 30  # large norms: cosine anyway
    targets = torch.arange(b).repeat_interleave(p)
    loss, extra = method._term(local, glob, targets)
    expected = local_infonce64(local, glob, method.temperature)
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert float(extra["mi_bound"]) == pytest.approx(math.log(b) - expected, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("rows,cols", [(1, 2), (6, 3), (257, 5)])
def test_jsd_loss_matches_float64_formula(rows, cols):
    scores = torch.randn(rows, cols, dtype=torch.float64) * 5
    positive = torch.zeros(rows, cols, dtype=torch.bool)
    positive[torch.arange(rows), torch.randint(0, cols, (rows,))] = True
    pos = [math.log1p(math.exp(-float(s))) for s in scores[positive]]
    neg = [math.log1p(math.exp(float(s))) for s in scores[~positive]]
    expected = sum(pos) / len(pos) + sum(neg) / len(neg)
    assert float(dim.jsd_loss(scores, positive)) == pytest.approx(expected, rel=1e-12)
    leaf = scores.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda s: dim.jsd_loss(s, positive), (leaf,))


def test_jsd_term_has_no_overflow_for_tiny_temperature():
    method = dim.build(backend="reference", estimator="jsd", temperature=1e-4, **TINY)
    loss, extra = method._term(torch.randn(12, 4), torch.randn(3, 4),
                               torch.arange(3).repeat_interleave(4))
    assert torch.isfinite(loss) and torch.isfinite(extra["mi_bound"])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("options", [{}, {"cross_view": False}, {"objective": "local"},
                                     {"objective": "global", "estimator": "jsd"},
                                     {"local_layer": 2, "normalize": False, "temperature": 1.0}])
def test_loss_and_gradients_equal_reference_backend(tiny_digits, backend, options):
    fused, reference = twin(dim.build, backend, **TINY, **options)
    batch = fused.views(tiny_digits, torch.arange(9), torch.Generator().manual_seed(3))
    out_f, out_r = fused.loss(batch), reference.loss(batch)
    torch.testing.assert_close(out_f["loss"], out_r["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_f["mi_bound"], out_r["mi_bound"], rtol=1e-5, atol=1e-5)
    out_f["loss"].backward()
    out_r["loss"].backward()
    assert_same_gradients(fused, reference)


@pytest.mark.parametrize("backend", FUSED)
def test_first_training_steps_equal_reference_backend(tiny_digits, backend):
    fused, reference = twin(dim.build, backend, **TINY)
    curve_f = train_losses(fused, tiny_digits, steps=4)
    curve_r = train_losses(reference, tiny_digits, steps=4)
    assert curve_f == pytest.approx(curve_r, rel=1e-4)


@pytest.mark.parametrize("estimator", dim.ESTIMATORS)
def test_loss_decreases_on_a_fixed_batch(tiny_digits, estimator):
    torch.manual_seed(1)
    method = dim.build(estimator=estimator, **TINY)
    assert_loss_decreases(method, tiny_digits, 0.05)


def test_shapes_and_determinism(tiny_digits):
    method = assert_deterministic(dim.build, tiny_digits, **TINY)
    batch = method.views(tiny_digits, torch.arange(4), torch.Generator().manual_seed(0))
    assert batch["local"].shape == batch["global"].shape == (4, 1, 24, 24)
    assert not torch.equal(batch["local"], batch["global"])  # cross_view: two renderings
    assert method.features(batch["local"]).shape == (4, 16)
    single = dim.build(cross_view=False, **TINY)
    batch = single.views(tiny_digits, torch.arange(4), None)
    assert batch["local"] is batch["global"]


def test_bad_input_is_rejected(tiny_digits):
    method = dim.build(**TINY)
    good = torch.rand(4, 1, 24, 24)
    with pytest.raises(TypeError, match="batch must be a dict"):
        method.loss(good)
    with pytest.raises(ValueError, match=r"images must be \(B >= 2, 1, H, W\), got shape "
                                         r"\(4, 3, 24, 24\)"):
        method.loss({"local": torch.rand(4, 3, 24, 24), "global": good})
    with pytest.raises(ValueError, match=r"got shape \(1, 1, 24, 24\)"):
        method.loss({"local": good[:1], "global": good[:1]})
    with pytest.raises(TypeError, match="floating"):
        method.loss({"local": good.long(), "global": good})
    with pytest.raises(ValueError, match="must have the shape of batch"):
        method.loss({"local": good, "global": good[:3]})
    with pytest.raises(ValueError, match="estimator must be one of"):
        dim.build(estimator="mine")
    with pytest.raises(ValueError, match="objective must be one of"):
        dim.build(objective="prior")
    with pytest.raises(ValueError, match="local_layer must index"):
        dim.build(local_layer=3)
    with pytest.raises(ValueError, match="temperature must be positive"):
        dim.build(temperature=0.0)
    with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
        dim.build(alpha=-1.0)
    with pytest.raises(TypeError, match="beta must be a float"):
        dim.build(beta="1")
    with pytest.raises(ValueError, match="unknown DIM settings"):
        dim.build(temprature=0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        dim.build(backend="gpu")
    with pytest.raises(TypeError, match="SmallConvEncoder"):
        dim.DeepInfoMax(torch.nn.Linear(3, 3))
