"""Evaluation on frozen features: linear probe, weighted kNN, the InfoNCE MI bound, feature
extraction and the baselines."""
import math

import pytest
import torch
from torch import nn

import fastcontrast
from fastcontrast.methods.evaluate import (extract_features, knn_accuracy, knn_predict,
                                           linear_probe, mi_lower_bound, raw_pixel_baseline,
                                           untrained_baseline)

PROBES = ["sklearn", "torch"]


def _blobs(n_per_class, n_classes, dim, separation, dtype=torch.float32, labels=None):
    """Unit-variance Gaussian blobs centred at ``separation`` times orthonormal random
    directions (n_classes <= dim), optionally relabelled with ``labels``."""
    centres = torch.linalg.qr(torch.randn(dim, n_classes, dtype=torch.float64))[0].T
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = separation * centres[y] + torch.randn(len(y), dim, dtype=torch.float64)
    perm = torch.randperm(len(y))
    y = y[perm] if labels is None else labels[y[perm]]
    return x[perm].to(dtype), y


def _split(x, y, n_train):
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@pytest.mark.parametrize("backend", PROBES)
@pytest.mark.parametrize("dim", [3, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_probe_separable_is_perfect(backend, dim, dtype):
    x, y = _blobs(60, min(dim, 4), dim, separation=12.0, dtype=dtype)
    assert linear_probe(*_split(x, y, 40 * min(dim, 4)), backend=backend) == 1.0


@pytest.mark.parametrize("backend", PROBES)
def test_probe_on_random_labels_is_chance(backend):
    x = torch.randn(1000, 20)
    y = torch.randint(0, 4, (1000,))
    acc = linear_probe(*_split(x, y, 400), backend=backend)
    assert abs(acc - 0.25) < 0.07, acc        # 4 standard deviations of a chance accuracy


def test_probe_backends_agree_on_a_hard_problem():
    x, y = _blobs(100, 5, 30, separation=2.5)
    split = _split(x, y, 300)
    a, b = linear_probe(*split, backend="sklearn"), linear_probe(*split, backend="torch")
    assert 0.5 < a < 0.97 and abs(a - b) <= 0.02, (a, b)


def test_probe_handles_arbitrary_and_unseen_labels():
    x, y = _blobs(50, 3, 5, separation=12.0, labels=torch.tensor([3, 7, 11]))
    tx, ty, vx, vy = _split(x, y, 90)
    for backend in PROBES:
        assert linear_probe(tx, ty, vx, vy, backend=backend) == 1.0
        unseen = vy.clone()
        unseen[:6] = 5                           # a class the probe never saw: always wrong
        assert linear_probe(tx, ty, vx, unseen, backend=backend) == pytest.approx(1 - 6 / 60)


def test_probe_regularisation_matters():
    """C is the inverse penalty: a tiny C shrinks W to 0 (the bias alone picks the majority)."""
    x, y = _blobs(100, 2, 10, separation=8.0)
    y[:30] = 0                                   # class 0 the majority of the training split
    split = _split(x, y, 150)
    assert linear_probe(*split, backend="torch") > 0.9
    majority = float((split[3] == torch.bincount(split[1]).argmax()).double().mean())
    assert linear_probe(*split, C=1e-8, backend="torch") == pytest.approx(majority)


# ---------------------------------------------------------------------------------------------
# kNN


def _knn_loop(train, train_y, test, k, temperature, metric):
    """Plain float64 loop: the definition of the weighted kNN vote."""
    train, test = train.double(), test.double()
    out = []
    for x in test:
        if metric == "cosine":
            s = (train @ x) / (train.norm(dim=1) * x.norm())
        else:
            s = -(train - x).norm(dim=1)
        order = sorted(range(len(train)), key=lambda j: -float(s[j]))[:k]
        votes = {}
        for j in order:
            c = int(train_y[j])
            votes[c] = votes.get(c, 0.0) + math.exp(float(s[j]) / temperature)
        best = max(votes.values())
        out.append(min(c for c, v in votes.items() if v == best))
    return torch.tensor(out)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("n_test, k, dim", [(1, 20, 3), (257, 5, 17), (40, 1000, 8)])
def test_knn_matches_the_definition_and_chunking(metric, n_test, k, dim):
    train, train_y = torch.randn(300, dim, dtype=torch.float64), torch.randint(0, 6, (300,))
    test = torch.randn(n_test, dim, dtype=torch.float64)
    t = 0.07 if metric == "cosine" else 1.0
    full = knn_predict(train, train_y, test, k=k, temperature=t, metric=metric,
                       chunk_size=10**6)
    chunked = knn_predict(train, train_y, test, k=k, temperature=t, metric=metric, chunk_size=7)
    assert torch.equal(full, chunked)
    assert torch.equal(full, _knn_loop(train, train_y, test, min(k, 300), t, metric))


def test_knn_weights_favour_close_neighbours():
    train = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]])   # cos to (1, 0): 1, .6, .6
    labels = torch.tensor([0, 1, 1])
    test = torch.tensor([[1.0, 0.0]])
    assert knn_predict(train, labels, test, k=3, temperature=0.07).item() == 0   # weighted
    assert knn_predict(train, labels, test, k=3, temperature=100.0).item() == 1  # ~majority


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_knn_separable_and_random(dtype):
    x, y = _blobs(60, 4, 32, separation=12.0, dtype=dtype)
    assert knn_accuracy(*_split(x, y, 160), k=20) == 1.0
    x = torch.randn(1400, 20).to(dtype)
    y = torch.randint(0, 4, (1400,))
    assert abs(knn_accuracy(*_split(x, y, 800), k=20) - 0.25) < 0.07


# ---------------------------------------------------------------------------------------------
# MI bound


def test_mi_lower_bound_formula():
    assert mi_lower_bound(1.0, 256) == pytest.approx(math.log(256) - 1.0)
    assert mi_lower_bound(0.5, 1) == -0.5
    loss = torch.tensor(2.0, requires_grad=True)
    bound = mi_lower_bound(loss, 64)
    bound.backward()
    assert bound.item() == pytest.approx(math.log(64) - 2.0) and loss.grad == -1.0


def test_mi_lower_bound_on_infonce():
    """Unrelated views give a bound near 0; identical views at a low temperature approach
    log(N), the ceiling of the bound."""
    n = 256
    q = torch.randn(n, 32, dtype=torch.float64)
    unrelated = fastcontrast.info_nce(q, torch.randn(n, 32, dtype=torch.float64),
                                      temperature=1.0, backend="reference")
    assert abs(mi_lower_bound(unrelated, n)) < 0.1
    same = fastcontrast.info_nce(q, q, temperature=0.01, backend="reference")
    assert math.log(n) - 1e-3 < float(mi_lower_bound(same, n)) <= math.log(n)


@pytest.mark.parametrize("loss, n, error, words", [
    (1.0, 0, ValueError, "n_candidates must be >= 1, got 0"),
    (1.0, 2.0, TypeError, "n_candidates must be an int"),
    ("1.0", 2, TypeError, "loss must be a float or a tensor, got str"),
    (torch.tensor(1), 2, TypeError, "loss must have a floating-point dtype"),
])
def test_mi_lower_bound_bad_input(loss, n, error, words):
    with pytest.raises(error, match=words):
        mi_lower_bound(loss, n)


# ---------------------------------------------------------------------------------------------
# Features and baselines


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


def test_extract_features_eval_mode_no_grad_and_restores_modes():
    net = _Net()
    net.train()
    net.bn.eval()                                # a mixed state must come back as it was
    x = torch.randn(37, 1, 6, 6)
    stats = net.bn.running_mean.clone()
    feats = extract_features(net, x, batch_size=5)
    assert feats.shape == (37, 4 * 4 * 4) and not feats.requires_grad
    assert net.training and net.conv.training and net.drop.training and not net.bn.training
    assert torch.equal(net.bn.running_mean, stats)          # no BN statistics update
    net.eval()
    with torch.no_grad():
        expected = net(x).flatten(1)
    torch.testing.assert_close(feats, expected)             # dropout off, batch independent
    assert not net.training
    assert torch.equal(extract_features(net, x, batch_size=1000), feats)


def test_extract_features_restores_modes_on_error():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    net = Broken().train()
    with pytest.raises(RuntimeError, match="boom"):
        extract_features(net, torch.zeros(2, 3))
    assert net.training


def test_raw_pixel_baseline_flattens():
    images, y = torch.rand(120, 1, 4, 4), torch.randint(0, 3, (120,))
    images[torch.arange(120), 0, y, y] += 5.0          # the label is written in the pixels
    split = _split(images, y, 80)
    acc = raw_pixel_baseline(*split)
    assert acc == 1.0
    assert acc == linear_probe(split[0].flatten(1), split[1], split[2].flatten(1), split[3])


def test_untrained_baseline_is_seeded_and_leaves_the_rng_alone():
    x, y = torch.rand(60, 1, 6, 6), torch.randint(0, 3, (60,))
    split = _split(x, y, 40)
    state = torch.get_rng_state()
    a = untrained_baseline(_Net, *split, seeds=(0, 1), k=5)
    assert torch.equal(state, torch.get_rng_state())
    b = untrained_baseline(_Net, *split, seeds=(0, 1), k=5)
    assert a == b and len(a["probe"]) == 2
    assert a["probe_mean"] == pytest.approx(sum(a["probe"]) / 2)


@pytest.mark.parametrize("call, error, words", [
    (lambda x, y: linear_probe(x, y, x, y, backend="svm"), ValueError, "backend must be one of"),
    (lambda x, y: linear_probe(x[:, 0], y, x, y), ValueError,
     r"train_features must be a non-empty 2-D \(N, D\) tensor, got shape \(10,\)"),
    (lambda x, y: linear_probe(x, y.float(), x, y), TypeError,
     "train_labels must have dtype torch.int64, got torch.float32"),
    (lambda x, y: linear_probe(x, y[:5], x, y), ValueError,
     r"train_labels must have shape \(10,\) to match train_features, got \(5,\)"),
    (lambda x, y: linear_probe(x, y, x[:, :2], y), ValueError, "test_features must have D = 3"),
    (lambda x, y: knn_accuracy(x, y, x.double(), y), TypeError,
     r"test_features must have the dtype of train_features \(torch.float32\)"),
    (lambda x, y: linear_probe(x.long(), y, x, y), TypeError,
     "train_features must have a floating-point dtype"),
    (lambda x, y: linear_probe(x * float("nan"), y, x, y), ValueError,
     "train_features must be finite"),
    (lambda x, y: linear_probe(x, y, x, y, C=0), ValueError, "C must be positive"),
    (lambda x, y: knn_accuracy(x, y, x, y, k=0), ValueError, "k must be >= 1, got 0"),
    (lambda x, y: knn_accuracy(x, y, x, y, metric="dot"), ValueError, "metric must be one of"),
    (lambda x, y: knn_accuracy(x, y, x, y, temperature=-1.0), ValueError, "temperature"),
    (lambda x, y: knn_accuracy(x, y, x, y, chunk_size=1.5), TypeError, "chunk_size must be an int"),
    (lambda x, y: extract_features(lambda t: t, x), TypeError, "encoder must be a torch.nn.Module"),
    (lambda x, y: extract_features(nn.Identity(), x, batch_size=0), ValueError, "batch_size"),
])
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error, match=words):
        call(torch.randn(10, 3), torch.randint(0, 2, (10,)))


def test_cluttered_digits_raw_pixels_are_near_chance():
    """Calibration of the benchmark: a linear probe on raw cluttered pixels stays near chance
    (about 11%; the plain 8x8 digits give about 97%), because position and clutter vary."""
    from fastcontrast.methods.data import ClutteredDigits

    train = ClutteredDigits("train").evaluation_set()
    test = ClutteredDigits("test").evaluation_set()
    assert 0.07 < raw_pixel_baseline(*train, *test) < 0.2
