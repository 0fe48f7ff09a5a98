"""fastcontrast.compat.lightly against the installed lightly: the same losses and input gradients
on the same inputs (float64 to 1e-12, float32 to 2e-5, relative to the value's scale), every
option, lightly's edge cases, the memory bank over several steps, the errors, and
patch("lightly") on a small SimCLR loop. NegativeQueue's persistent / next_slot too."""
import functools
import importlib
import math

import pytest
import torch

import fastcontrast.compat
from fastcontrast.cli.bench import benchmarks_package
from fastcontrast.compat import lightly as compat
from fastcontrast.queue import NegativeQueue
from tests._helpers import assert_close

benchmarks_package()
from fastcontrast.benchmarks import peers  # noqa: E402

from ._parity import PARITY  # noqa: E402


@pytest.fixture(scope="module")
def lightly():
    """(lightly.loss.dcl_loss, lightly.loss.ntx_ent_loss), loaded through the benchmark's import
    shims; the test is skipped where lightly is not installed."""
    ntx, reason = peers.load_peer("lightly")
    if reason is not None:
        pytest.skip(reason)
    modules = ("lightly.loss.dcl_loss", ntx.__module__)
    return tuple(importlib.import_module(name) for name in modules)


def _views(n, d, dtype):
    return [torch.randn(n, d, dtype=dtype, requires_grad=True) for _ in range(2)]


def _loss_and_grads(loss_fn, out0, out1):
    a, b = (t.detach().clone().requires_grad_() for t in (out0, out1))
    loss = loss_fn(a, b)
    return (loss, *torch.autograd.grad(loss, (a, b)))


def _assert_parity(ours, theirs, out0, out1, what):
    for name, x, y in zip(("loss", "grad out0", "grad out1"), _loss_and_grads(ours, out0, out1),
                          _loss_and_grads(theirs, out0, out1)):
        assert_close(x, y, out0.dtype, f"{what} {name}", tolerances=PARITY)


SHAPES = [(1, 3), (2, 3), (9, 16), (257, 3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("temperature", [0.5, 0.07, 1.0])
def test_ntxent_matches_lightly(lightly, dtype, n, d, temperature):
    _, ntx = lightly
    out0, out1 = _views(n, d, dtype)
    _assert_parity(compat.NTXentLoss(temperature), ntx.NTXentLoss(temperature), out0, out1,
                   f"NTXentLoss({temperature})")


def _dcl_pairs(dcl):
    """(ours, lightly's) for every way of building DCL / DCLW."""
    return [
        (compat.DCLLoss(), dcl.DCLLoss()),
        (compat.DCLLoss(0.3), dcl.DCLLoss(0.3)),
        (compat.DCLLoss(weight_fn=dcl.negative_mises_fisher_weights),
         dcl.DCLLoss(weight_fn=dcl.negative_mises_fisher_weights)),
        (compat.DCLLoss(0.2, functools.partial(dcl.negative_mises_fisher_weights, sigma=0.3)),
         dcl.DCLLoss(0.2, functools.partial(dcl.negative_mises_fisher_weights, sigma=0.3))),
        (compat.DCLWLoss(), dcl.DCLWLoss()),
        (compat.DCLWLoss(0.5, sigma=0.2), dcl.DCLWLoss(0.5, sigma=0.2)),
    ]


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # lightly's torch.tensor
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,d", SHAPES[1:])
def test_dcl_and_dclw_match_lightly(lightly, dtype, n, d):
    dcl, _ = lightly
    out0, out1 = _views(n, d, dtype)
    for ours, theirs in _dcl_pairs(dcl):
        _assert_parity(ours, theirs, out0, out1, f"{type(theirs).__name__} {theirs.__dict__}")


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_gather_distributed_in_one_process_is_local(lightly):
    """Without an initialised process group (or with one process) nothing is gathered."""
    dcl, ntx = lightly
    out0, out1 = _views(7, 4, torch.float64)
    for ours, theirs in ((compat.NTXentLoss(0.3, gather_distributed=True),
                          ntx.NTXentLoss(0.3, gather_distributed=True)),
                         (compat.DCLWLoss(0.3, gather_distributed=True),
                          dcl.DCLWLoss(0.3, gather_distributed=True))):
        _assert_parity(ours, theirs, out0, out1, type(theirs).__name__)


def test_dcl_with_one_pair_is_zero_where_lightly_gives_minus_inf(lightly):
    dcl, _ = lightly
    out0, out1 = _views(1, 4, torch.float64)
    assert torch.isneginf(dcl.DCLLoss()(out0, out1))
    loss = compat.DCLLoss()(out0, out1)
    assert loss.item() == 0.0
    loss.backward()
    assert not out0.grad.any()


def test_ntxent_of_orthogonal_views_is_log3(lightly):
    """Two pairs of mutually orthogonal views: each of the 4 rows has 3 candidates with equal
    similarity, so the loss is log 3 at any temperature (lightly's own check at temperature 1)."""
    _, ntx = lightly
    eye = torch.eye(4, dtype=torch.float64)
    for temperature in (1.0, 0.1):
        for loss_fn in (compat.NTXentLoss(temperature), ntx.NTXentLoss(temperature)):
            assert abs(loss_fn(eye[:2], eye[2:]).item() - math.log(3)) < 1e-14


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")
def test_losses_are_symmetric_in_the_views(lightly):
    out0, out1 = _views(6, 5, torch.float64)
    for loss_fn in (compat.NTXentLoss(), compat.DCLLoss(), compat.DCLWLoss()):
        assert abs(loss_fn(out0, out1).item() - loss_fn(out1, out0).item()) < 1e-12


def test_attributes_and_state_dict_as_lightly(lightly):
    dcl, ntx = lightly
    pairs = [(compat.NTXentLoss(0.2, (16, 4)), ntx.NTXentLoss(0.2, (16, 4))),
             (compat.DCLLoss(0.3), dcl.DCLLoss(0.3)), (compat.DCLWLoss(0.3), dcl.DCLWLoss(0.3))]
    for ours, theirs in pairs:
        assert ours.temperature == theirs.temperature
        assert ours.gather_distributed == theirs.gather_distributed
        assert list(ours.state_dict()) == list(theirs.state_dict()) == []


# ---------------------------------------------------------------------------------------------
# Memory bank


def _bank_steps(ours, theirs, batches, dtype, compare_from=0):
    """Feed both losses the same batches (one without gradient: no enqueue); compare the
    losses and gradients from step ``compare_from`` on."""
    for step, (n, grad) in enumerate(batches):
        out0, out1 = _views(n, ours.memory_bank.dim, dtype)
        if grad:
            results = [_loss_and_grads(f, out0, out1) for f in (ours, theirs)]
        else:
            results = [(f(out0.detach(), out1.detach()),) for f in (ours, theirs)]
        if step >= compare_from:
            for name, x, y in zip(("loss", "grad out0", "grad out1"), *results):
                assert_close(x, y, dtype, f"step {step} {name}", tolerances=PARITY)


BATCHES = [(3, True), (4, True), (5, False), (6, True), (12, True), (2, True), (5, True)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_memory_bank_matches_lightly_from_the_first_step(lightly, dtype):
    """Built after the same seed, both banks start from the same random unit vectors; batches
    that do not divide the bank size exercise lightly's truncating ring; a no-grad call does not
    enqueue."""
    _, ntx = lightly
    torch.manual_seed(1)
    ours = compat.NTXentLoss(0.2, memory_bank_size=(10, 5)).to(dtype)
    torch.manual_seed(1)
    theirs = ntx.NTXentLoss(0.2, memory_bank_size=[10, 5]).to(dtype)
    assert ours.memory_bank.keys.dtype == dtype
    _bank_steps(ours, theirs, BATCHES, dtype)
    assert torch.equal(ours.memory_bank.keys, theirs.memory_bank.bank)
    assert ours.memory_bank.next_slot == int(theirs.memory_bank.bank_ptr)


def test_memory_bank_equals_lightly_once_wrapped_from_any_initial_bank(lightly):
    """Different initial banks (other seeds): once the batches have overwritten every slot the
    banks, and so the losses, are the same."""
    _, ntx = lightly
    torch.manual_seed(2)
    ours = compat.NTXentLoss(0.5, memory_bank_size=(8, 3)).double()
    torch.manual_seed(3)
    theirs = ntx.NTXentLoss(0.5, memory_bank_size=(8, 3)).double()
    _bank_steps(ours, theirs, [(4, True), (4, True), (3, True), (5, True), (6, True)],
                torch.float64, compare_from=2)


def test_disabled_memory_bank_is_simclr(lightly):
    out0, out1 = _views(5, 4, torch.float64)
    for size in (0, (0, 4)):
        loss_fn = compat.NTXentLoss(memory_bank_size=size)
        assert loss_fn.memory_bank is None
        assert loss_fn(out0, out1).item() == compat.NTXentLoss()(out0, out1).item()


def test_queue_persistent_and_next_slot():
    queue = NegativeQueue(5, 2)
    assert set(queue.state_dict()) == {"keys", "pointer", "count"}
    scratch = NegativeQueue(5, 2, store_labels=True, persistent=False)
    assert list(scratch.state_dict()) == [] and len(list(scratch.buffers())) == 4
    for batch, slot in ((3, 3), (3, 1), (4, 0), (7, 2)):
        scratch.enqueue(torch.randn(batch, 2), labels=torch.arange(batch))
        assert scratch.next_slot == slot == int(scratch.pointer)
    with pytest.raises(TypeError, match="persistent"):
        NegativeQueue(5, 2, persistent=1)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("make,error,match", [
    (lambda: compat.NTXentLoss(0.0), ValueError, "temperature must be > 0"),
    (lambda: compat.NTXentLoss(-0.5), ValueError, "temperature must be > 0.*got -0.5"),
    (lambda: compat.DCLLoss("0.1"), TypeError, "temperature must be a float"),
    (lambda: compat.NTXentLoss(memory_bank_size=16), ValueError, r"\(16, dim\)"),
    (lambda: compat.NTXentLoss(memory_bank_size=(-1, 4)), ValueError, "non-negative"),
    (lambda: compat.NTXentLoss(memory_bank_size=(4, 4, 4)), ValueError, "memory_bank_size"),
    (lambda: compat.NTXentLoss(memory_bank_size=True), TypeError, "memory_bank_size"),
    (lambda: compat.NTXentLoss(gather_distributed=1), TypeError, "gather_distributed"),
    (lambda: compat.DCLLoss(weight_fn=lambda a, b: torch.ones(len(a))), NotImplementedError,
     "weight_fn"),
    (lambda: compat.DCLWLoss(sigma=0), ValueError, "sigma must be > 0"),
])
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("loss_fn", [compat.NTXentLoss(), compat.NTXentLoss(0.1, (8, 4)),
                                     compat.DCLWLoss()])
@pytest.mark.parametrize("out0,out1,error,match", [
    (torch.randn(3, 4), torch.randn(2, 4), ValueError, r"same shape, got \(3, 4\) and \(2, 4\)"),
    (torch.randn(4), torch.randn(4), ValueError, "out0 must have shape"),
    (torch.randn(3, 4), torch.ones(3, 4, dtype=torch.long), TypeError, "out1 must have a "),
    (torch.randn(3, 4), None, TypeError, "out1 must be a torch.Tensor"),
])
def test_bad_forward_arguments(loss_fn, out0, out1, error, match):
    with pytest.raises(error, match=match):
        loss_fn(out0, out1)


def test_memory_bank_dimension_must_match():
    with pytest.raises(ValueError, match="embedding_size 4"):
        compat.NTXentLoss(0.1, (8, 4))(torch.randn(2, 3), torch.randn(2, 3))


# ---------------------------------------------------------------------------------------------
# patch("lightly") on a SimCLR-style loop


def _train_simclr(steps=4):
    """A few SGD steps of a linear encoder on two noisy views; the loss class is looked up in
    lightly's module at run time, as a training script that imports lightly does."""
    torch.manual_seed(5)
    encoder = torch.nn.Linear(8, 4)
    loss_fn = importlib.import_module("lightly.loss.ntx_ent_loss").NTXentLoss(
        temperature=0.2, memory_bank_size=(16, 4))
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.5)
    data = torch.randn(steps, 6, 8)
    losses = []
    for batch in data:
        loss = loss_fn(encoder(batch + 0.1 * torch.randn_like(batch)),
                       encoder(batch + 0.1 * torch.randn_like(batch)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return type(loss_fn), torch.tensor(losses), encoder.weight.detach().clone()


def test_patch_runs_a_training_loop_on_fastcontrast(lightly):
    dcl, ntx = lightly
    originals = (ntx.NTXentLoss, dcl.DCLLoss, dcl.DCLWLoss)
    cls, losses, weight = _train_simclr()
    assert cls is originals[0]
    fastcontrast.compat.patch("lightly")
    try:
        assert (ntx.NTXentLoss, dcl.DCLLoss, dcl.DCLWLoss) == (
            compat.NTXentLoss, compat.DCLLoss, compat.DCLWLoss)
        patched_cls, patched_losses, patched_weight = _train_simclr()
    finally:
        fastcontrast.compat.unpatch("lightly")
    assert patched_cls is compat.NTXentLoss
    assert_close(patched_losses, losses, torch.float32, "losses", tolerances=PARITY)
    assert_close(patched_weight, weight, torch.float32, "weights", tolerances=PARITY)
    assert (ntx.NTXentLoss, dcl.DCLLoss, dcl.DCLWLoss) == originals
