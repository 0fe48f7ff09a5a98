"""fastcontrast.compat.pytorch_metric_learning against the installed pytorch-metric-learning:
the same losses and gradients (embeddings and ref_emb) on the same inputs, float64 to 1e-12 and
float32 to 2e-5 relative to the value's scale, over label sets with singleton classes, rows
without positives, a single class, a query set against a reference set, every supported reducer;
the refused options; patch("pytorch_metric_learning") on a small supervised loop."""
import importlib

import pytest
import torch

import fastcontrast.compat
from fastcontrast.compat import pytorch_metric_learning as compat
from tests._helpers import assert_close

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, losses, reducers, regularizers  # noqa: E402

from ._parity import PARITY  # noqa: E402

CLASSES = [(compat.NTXentLoss, losses.NTXentLoss), (compat.SupConLoss, losses.SupConLoss)]


def _run(loss_fn, embeddings, labels, ref_emb=None, ref_labels=None):
    """(loss, grad embeddings[, grad ref_emb]) on fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in (embeddings, ref_emb) if t is not None]
    ref = leaves[1] if ref_emb is not None else None
    loss = loss_fn(leaves[0], labels, ref_emb=ref, ref_labels=ref_labels)
    return (loss, *torch.autograd.grad(loss, leaves, materialize_grads=True))


def _assert_parity(ours, theirs, embeddings, labels, ref_emb=None, ref_labels=None, what=""):
    expected = _run(theirs, embeddings, labels, ref_emb, ref_labels)
    actual = _run(ours, embeddings, labels, ref_emb, ref_labels)
    for name, x, y in zip(("loss", "grad embeddings", "grad ref_emb"), actual, expected):
        assert_close(x, y, embeddings.dtype, f"{what} {name}", tolerances=PARITY)
    return actual[0]


def _labels(kind, n):
    if kind == "few classes":
        return torch.randint(0, 3, (n,))
    if kind == "singletons and pairs":  # many classes: singletons, rows without positive
        return torch.randint(0, n, (n,))
    if kind == "all singletons":
        return torch.randperm(n)
    return torch.zeros(n, dtype=torch.long)  # one class


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d", [(1, 3), (2, 3), (10, 16), (257, 3)])
@pytest.mark.parametrize("kind", ["few classes", "singletons and pairs", "all singletons",
                                  "one class"])
@pytest.mark.parametrize("classes", CLASSES, ids=["NTXent", "SupCon"])
def test_matches_pml(classes, kind, n, d, dtype):
    ours, theirs = classes
    if theirs is losses.NTXentLoss and n > 100 and kind == "few classes":
        pytest.skip("pml's NTXentLoss forms a (positive pairs) x (negative pairs) mask: 1e9 "
                    "elements here")
    embeddings, labels = torch.randn(n, d, dtype=dtype), _labels(kind, n)
    loss = _assert_parity(ours(0.3), theirs(0.3), embeddings, labels, what=kind)
    if kind in ("all singletons", "one class") or n == 1:  # no positive / no negative pair
        assert loss.item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("classes", CLASSES, ids=["NTXent", "SupCon"])
def test_query_set_against_reference_set(classes, dtype):
    ours, theirs = classes
    embeddings, labels = torch.randn(12, 5, dtype=dtype), torch.randint(0, 4, (12,))
    for m in (1, 7, 40):
        ref_emb, ref_labels = torch.randn(m, 5, dtype=dtype), torch.randint(0, 5, (m,))
        _assert_parity(ours(), theirs(), embeddings, labels, ref_emb, ref_labels, f"M={m}")
    # the batch again as its own reference set (a copy of the labels): i == j is a positive
    _assert_parity(ours(), theirs(), embeddings, labels, embeddings.clone(), labels.clone(),
                   "batch as reference")


@pytest.mark.parametrize("classes", CLASSES, ids=["NTXent", "SupCon"])
def test_one_positive_and_one_negative_pair_give_pml_zero(classes):
    """pml returns its zero loss when there are at most one positive and one negative pair."""
    ours, theirs = classes
    embeddings, ref_emb = torch.randn(1, 4), torch.randn(2, 4)
    labels, ref_labels = torch.tensor([0]), torch.tensor([0, 1])
    loss = _assert_parity(ours(), theirs(), embeddings, labels, ref_emb, ref_labels)
    assert loss.item() == 0.0


REDUCERS = [reducers.MeanReducer, reducers.SumReducer, reducers.AvgNonZeroReducer,
            lambda: reducers.ThresholdReducer(low=1.0, high=4.0)]


@pytest.mark.parametrize("make_reducer", REDUCERS)
@pytest.mark.parametrize("classes", CLASSES, ids=["NTXent", "SupCon"])
def test_reducers_and_default_distance(classes, make_reducer):
    ours, theirs = classes
    embeddings, labels = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 6, (16,))
    kwargs = dict(temperature=0.5, reducer=make_reducer(), distance=distances.CosineSimilarity(),
                  embedding_reg_weight=2.0, collect_stats=False)
    _assert_parity(ours(**kwargs), theirs(**kwargs), embeddings, labels, what=kwargs)


@pytest.mark.parametrize("labels", [torch.tensor([3, 3, 7, 7, 1, 3], dtype=torch.int32),
                                    torch.tensor([0.5, 0.5, 2.0, 2.0, -1.0, 0.5]),
                                    torch.tensor([-4, -4, 9, 9, 0, -4])])
@pytest.mark.parametrize("classes", CLASSES, ids=["NTXent", "SupCon"])
def test_label_dtypes_and_values(classes, labels):
    ours, theirs = classes
    _assert_parity(ours(), theirs(), torch.randn(6, 3, dtype=torch.float64), labels)


def test_defaults_and_attributes():
    for ours, theirs in CLASSES:
        assert ours().temperature == theirs().temperature
        assert list(ours().state_dict()) == list(theirs().state_dict()) == []


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(distance=distances.LpDistance()), NotImplementedError, "distance="),
    (dict(distance=distances.CosineSimilarity(power=2)), NotImplementedError, "distance="),
    (dict(distance=distances.DotProductSimilarity()), NotImplementedError, "distance="),
    (dict(reducer=reducers.DoNothingReducer()), NotImplementedError, "reducer="),
    (dict(reducer=reducers.PerAnchorReducer()), NotImplementedError, "reducer="),
    (dict(reducer=reducers.MeanReducer(collect_stats=True)), NotImplementedError,
     "collect_stats"),
    (dict(embedding_regularizer=regularizers.LpRegularizer()), NotImplementedError,
     "embedding_regularizer"),
    (dict(collect_stats=True), NotImplementedError, "collect_stats"),
    (dict(margin=0.1), TypeError, r"unexpected keyword arguments \['margin'\]"),
    (dict(temperature=0.0), ValueError, "temperature must be > 0, got 0.0"),
    (dict(temperature="0.1"), TypeError, "temperature must be a float"),
])
@pytest.mark.parametrize("cls", [compat.NTXentLoss, compat.SupConLoss])
def test_refused_options(cls, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls(**kwargs)


E, L = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((E, L), dict(indices_tuple=(L, L, L)), NotImplementedError, "indices_tuple"),
    ((E,), {}, ValueError, "labels and indices_tuple cannot both be None"),
    ((E, L[:3]), {}, ValueError, r"labels must have one entry per embedding \(4\), got 3"),
    ((E, L[:, None]), {}, ValueError, "labels must be a 1D tensor"),
    ((E[0], L), {}, ValueError, "embeddings must be a floating"),
    ((E.long(), L), {}, ValueError, "embeddings must be a floating"),
    ((E, L), dict(ref_emb=E), NotImplementedError, "ref_emb without ref_labels"),
    ((E, L), dict(ref_emb=E.clone(), ref_labels=L), NotImplementedError, "ref_labels is labels"),
    ((E, L), dict(ref_emb=torch.randn(2, 5), ref_labels=L[:2]), ValueError, "ref_emb must match"),
    ((E, L), dict(ref_emb=torch.randn(2, 3), ref_labels=L), ValueError,
     r"ref_labels must have one entry per embedding \(2\), got 4"),
])
@pytest.mark.parametrize("cls", [compat.NTXentLoss, compat.SupConLoss])
def test_bad_forward_arguments(cls, args, kwargs, error, match):
    with pytest.raises(error, match=match):
        cls()(*args, **kwargs)


def _train_supervised(steps=4):
    """A few SGD steps of a linear encoder on labelled data; the loss class is looked up in
    pml's package at run time, as a training script that imports pml does."""
    torch.manual_seed(6)
    encoder = torch.nn.Linear(8, 4)
    loss_fn = importlib.import_module("pytorch_metric_learning.losses").SupConLoss(0.2)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.5)
    data, labels = torch.randn(steps, 12, 8), torch.randint(0, 4, (steps, 12))
    history = []
    for batch, batch_labels in zip(data, labels):
        loss = loss_fn(encoder(batch), batch_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    return type(loss_fn), torch.tensor(history), encoder.weight.detach().clone()


def _patched_run():
    """_train_supervised under patch("pytorch_metric_learning"), with the classes it found in
    pml's modules meanwhile."""
    from pytorch_metric_learning.losses import ntxent_loss, supcon_loss

    fastcontrast.compat.patch("pytorch_metric_learning")
    try:
        seen = (losses.NTXentLoss, ntxent_loss.NTXentLoss, losses.SupConLoss,
                supcon_loss.SupConLoss)
        return seen, _train_supervised()
    finally:
        fastcontrast.compat.unpatch("pytorch_metric_learning")


def test_patch_runs_a_training_loop_on_fastcontrast():
    from pytorch_metric_learning.losses import ntxent_loss, supcon_loss

    originals = (losses.NTXentLoss, losses.SupConLoss)
    unpatched = _train_supervised()
    seen, patched = _patched_run()
    assert seen == (compat.NTXentLoss,) * 2 + (compat.SupConLoss,) * 2
    assert (unpatched[0], patched[0]) == (originals[1], compat.SupConLoss)
    for name, ours, theirs in zip(("losses", "weights"), patched[1:], unpatched[1:]):
        assert_close(ours, theirs, torch.float32, name, tolerances=PARITY)
    assert (losses.NTXentLoss, losses.SupConLoss) == originals
    assert (ntxent_loss.NTXentLoss, supcon_loss.SupConLoss) == originals
