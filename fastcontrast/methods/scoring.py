"""Scores of a trained reference method and the floor / ceiling it is compared with.

    scores = evaluate(method, train, test)              # {"probe": .., "knn": ..}
    floor_and_ceiling = baselines(lambda: build("simclr"), train, test, seconds=180, ...)

Evaluation is on frozen features of the fixed renderings (``dataset.evaluation_set()``, else the
stacked items): the linear probe and kNN (``evaluate.py``) are fitted on the training split and
scored on the test split.
"""
import time

import torch
import torch.nn.functional as F
from torch import nn

from . import evaluate as ev
from .base import MethodCall
from .trainer import _batches, _check_method, evaluation_inputs, training_inputs


class FeatureModule(MethodCall):
    """``method.features`` as a module's forward, so ``extract_features`` handles eval mode."""

    call = "features"


def evaluate(method, train_set, test_set, *, k=20, batch_size=256):
    """{"probe": linear-probe accuracy, "knn": weighted kNN accuracy} of ``method.features``
    (frozen, eval mode) fitted on the training split's evaluation inputs and scored on the test
    split's."""
    _check_method(method)
    train_x, train_y = evaluation_inputs(train_set)
    test_x, test_y = evaluation_inputs(test_set)
    wrapped = FeatureModule(method)
    train_f = ev.extract_features(wrapped, train_x, batch_size=batch_size)
    test_f = ev.extract_features(wrapped, test_x, batch_size=batch_size)
    return {"probe": ev.linear_probe(train_f, train_y, test_f, test_y),
            "knn": ev.knn_accuracy(train_f, train_y, test_f, test_y, k=k)}


class Supervised(nn.Module):
    """The ceiling baseline: a method's feature network with a linear classifier on top,
    trained with cross-entropy on single augmented views of labelled items."""

    def __init__(self, method, num_classes, feature_dim):
        super().__init__()
        self.method = method
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.classifier(self.method.features(x))


def train_supervised(method, dataset, *, seconds=None, steps=None, batch_size, lr, seed=0):
    """Train ``method.features`` + a linear layer with cross-entropy on ``training_inputs``
    for the budget (as ``fit``); returns (the Supervised model, steps done)."""
    _check_method(method)
    if seconds is None and steps is None:
        raise ValueError("train_supervised needs a budget: seconds and/or steps, got neither")
    x, y = evaluation_inputs(dataset)
    with torch.no_grad():
        dim = FeatureModule(method).eval()(x[:2]).flatten(1).shape[1]
    model = Supervised(method, int(y.max()) + 1, dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    done, start, count = False, time.perf_counter(), 0
    while not done:
        for indices in _batches(len(dataset), batch_size, generator):
            if (steps is not None and count >= steps) or (
                    seconds is not None and time.perf_counter() - start >= seconds):
                done = True
                break
            inputs, labels = training_inputs(dataset, indices, generator)
            logits = model(inputs)
            if not logits.requires_grad:
                raise RuntimeError(f"{method.name}.features must be differentiable (no "
                                   f"torch.no_grad inside) for the supervised baseline")
            loss = F.cross_entropy(logits.flatten(1), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            count += 1
    return model, count


def baselines(make_method, train_set, test_set, *, seconds=None, steps=None, batch_size=256,
              lr=1e-3, seed=0, supervised=True, raw=True):
    """The floor and ceiling a trained method is compared with, as accuracies:

    * "untrained": ``evaluate`` of a fresh ``make_method()`` (the same encoder, random weights);
    * "raw": linear probe on the flattened evaluation inputs (``raw``);
    * "supervised": a fresh ``make_method()``'s feature network + linear layer trained with
      cross-entropy for the same budget (``supervised``), then evaluated like the method."""
    result = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result["untrained"] = evaluate(make_method(), train_set, test_set)
    if raw:
        train_x, train_y = evaluation_inputs(train_set)
        test_x, test_y = evaluation_inputs(test_set)
        result["raw"] = {"probe": ev.raw_pixel_baseline(train_x, train_y, test_x, test_y)}
    if supervised:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            method = make_method()
            start = time.perf_counter()
            model, done = train_supervised(method, train_set, seconds=seconds, steps=steps,
                                           batch_size=batch_size, lr=lr, seed=seed)
            result["supervised"] = {**evaluate(method, train_set, test_set), "steps": done,
                                    "seconds": time.perf_counter() - start}
            test_x, test_y = evaluation_inputs(test_set)
            model.eval()
            with torch.no_grad():
                predicted = model(test_x).argmax(1)
            result["supervised"]["classifier"] = float((predicted == test_y).double().mean())
    return result
