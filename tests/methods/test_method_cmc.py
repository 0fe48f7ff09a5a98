"""CMC (fastcontrast.methods.cmc): pair losses against a float64 formula (in-batch and memory
bank), core-view / full-graph terms, the fused loss against backend="reference", the first
training steps, determinism and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastcontrast.methods import cmc

from .test_method_dim import (FUSED, assert_deterministic,  # noqa: F401 (fixtures)
                              assert_loss_decreases, assert_same_gradients, one_thread,
                              tiny_digits, train_losses, twin)

TINY = {"width": 8, "out_dim": 8, "projection_dim": 8}


def direction64(za, zb, bank, bank_ids, ids, tau):
    """Float64 mean_i -log softmax over [cos(a_i, b_m)/tau for m in batch] + [cos(a_i, u)/tau
    for bank rows u whose id differs from ids[i]], the positive b_i."""
    za, zb = F.normalize(za.double(), dim=1), F.normalize(zb.double(), dim=1)
    total = 0.0
    for i in range(za.shape[0]):
        scores = list(za[i] @ zb.T / tau)
        if bank is not None:
            u = F.normalize(bank.double(), dim=1)
            scores += [za[i] @ u[k] / tau for k in range(len(u)) if bank_ids[k] != ids[i]]
        scores = torch.stack(scores)
        total += float(torch.logsumexp(scores, 0) - scores[i])
    return total / za.shape[0]


@pytest.mark.parametrize("b,d", [(1, 3), (2, 5), (9, 4)])
def test_in_batch_pair_loss_matches_float64(b, d):
    method = cmc.build(backend="reference", **TINY)
    z = [torch.randn(b, d) * 40, torch.randn(b, d)]
    loss, n = method._pair_loss(z, 0, 1, None)
    expected = (direction64(z[0], z[1], None, None, None, 0.1)
                + direction64(z[1], z[0], None, None, None, 0.1)) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert n == b


@pytest.mark.parametrize("backend", FUSED + ["reference"])
def test_queue_pair_loss_matches_float64(backend):
    method = cmc.build(backend=backend, negatives="queue", queue_size=7, temperature=0.05,
                       **TINY)
    for step in range(3):   # fills and wraps the size-7 queues; some ids reappear
        ids = torch.tensor([3, 0, 5, 1, 9]) + 2 * step
        z = [torch.randn(5, 8), torch.randn(5, 8)]
        banks = [(q.negatives().clone(), q.stored_indices().clone()) for q in method.queues]
        loss, n = method._pair_loss(z, 0, 1, ids)
        expected = (direction64(z[0], z[1], *(banks[1] if step else (None, None)), ids, 0.05)
                    + direction64(z[1], z[0], *(banks[0] if step else (None, None)), ids,
                                  0.05)) / 2
        assert float(loss) == pytest.approx(expected, rel=1e-5)
        assert n == 5 + min(5 * step, 7)
        for queue, embedding in zip(method.queues, z):
            queue.enqueue(F.normalize(embedding, dim=1), indices=ids)


@pytest.mark.parametrize("graph,expected", [("core", [(0, 1), (0, 2)]),
                                            ("full", [(0, 1), (0, 2), (1, 2)])])
def test_core_view_and_full_graph_pairs(tiny_digits, graph, expected):
    method = cmc.build(views=("low", "high", "full"), graph=graph, **TINY)
    assert method.pairs == expected
    batch = method.views(tiny_digits, torch.arange(6), torch.Generator().manual_seed(1))
    out = method.loss(batch)
    with torch.no_grad():
        z = [h(e(v)) for v, e, h in zip(batch["views"], method.encoders, method.heads)]
    # encoders in train mode: recompute with the same BatchNorm batches
    total = sum(float(method._pair_loss(z, j, k, None)[0]) for j, k in expected)
    assert float(out["loss"].detach()) == pytest.approx(total, rel=1e-5)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("options", [{}, {"negatives": "queue", "queue_size": 10},
                                     {"views": ("top", "bottom", "left"), "graph": "full"},
                                     {"shared_rendering": True}])
def test_loss_and_gradients_equal_reference_backend(tiny_digits, backend, options):
    fused, reference = twin(cmc.build, backend, **TINY, **options)
    generator = torch.Generator().manual_seed(4)
    for step in range(2):   # the second step sees a filled queue
        batch = fused.views(tiny_digits, torch.arange(6) + step, generator)
        out_f, out_r = fused.loss(batch), reference.loss(batch)
        torch.testing.assert_close(out_f["loss"], out_r["loss"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(out_f["mi_bound"], out_r["mi_bound"], rtol=1e-5, atol=1e-5)
        fused.zero_grad()
        reference.zero_grad()
        out_f["loss"].backward()
        out_r["loss"].backward()
        assert_same_gradients(fused, reference)
        fused.after_step()
        reference.after_step()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("negatives", cmc.NEGATIVES)
def test_first_training_steps_equal_reference_backend(tiny_digits, backend, negatives):
    fused, reference = twin(cmc.build, backend, negatives=negatives, queue_size=16, **TINY)
    curve_f = train_losses(fused, tiny_digits, steps=4)
    curve_r = train_losses(reference, tiny_digits, steps=4)
    assert curve_f == pytest.approx(curve_r, rel=1e-4)


def test_loss_decreases_on_a_fixed_batch(tiny_digits):
    torch.manual_seed(1)
    method = cmc.build(**TINY)
    assert_loss_decreases(method, tiny_digits, 0.1)


def test_views_features_and_determinism(tiny_digits):
    method = assert_deterministic(cmc.build, tiny_digits, views=("low", "high", "top"), **TINY)
    batch = method.views(tiny_digits, torch.arange(4), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in batch["views"]] == [(4, 1, 24, 24), (4, 1, 24, 24),
                                                        (4, 1, 12, 24)]
    assert method.features(torch.rand(4, 1, 24, 24)).shape == (4, 3 * 8)
    image = torch.rand(2, 1, 24, 24)
    low, high = (cmc.view_transform(n, image, 1.0) for n in ("low", "high"))
    torch.testing.assert_close(low + high, image)
    left, right = (cmc.view_transform(n, image, 1.0) for n in ("left", "right"))
    torch.testing.assert_close(torch.cat([left, right], 3), image)
    out = method.loss(batch)
    loss = float(out["loss"].detach())
    assert float(out["mi_bound"]) == pytest.approx(math.log(4) - loss / 2, rel=1e-5)


def test_bad_input_is_rejected(tiny_digits):
    method = cmc.build(negatives="queue", **TINY)
    good = torch.rand(4, 1, 24, 24)
    with pytest.raises(TypeError, match="batch must be a dict with 'views'"):
        method.loss(good)
    with pytest.raises(ValueError, match=r"must hold 2 views \('low', 'high'\), got 3"):
        method.loss({"views": [good, good, good], "index": torch.arange(4)})
    with pytest.raises(ValueError, match=r"every view must have B = 4 samples, got \[4, 3\]"):
        method.loss({"views": [good, good[:3]], "index": torch.arange(4)})
    with pytest.raises(TypeError, match="must be a torch.Tensor of int64"):
        method.loss({"views": [good, good], "index": None})
    with pytest.raises(ValueError, match=r"batch\['index'\] must have shape \(4,\)"):
        method.loss({"views": [good, good], "index": torch.arange(3)})
    with pytest.raises(ValueError, match="views must be 2 or more distinct names"):
        cmc.build(views=("low",))
    with pytest.raises(ValueError, match="views must be 2 or more distinct names"):
        cmc.build(views=("low", "ab"))
    with pytest.raises(ValueError, match="graph must be one of"):
        cmc.build(graph="star")
    with pytest.raises(ValueError, match="negatives must be one of"):
        cmc.build(negatives="memory")
    with pytest.raises(ValueError, match="temperature must be positive"):
        cmc.build(temperature=-1.0)
    with pytest.raises(TypeError, match="queue_size must be an int"):
        cmc.build(negatives="queue", queue_size=2.5)
    with pytest.raises(ValueError, match="unknown CMC settings"):
        cmc.build(view=("low", "high"))
