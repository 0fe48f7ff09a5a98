"""fastcontrast.compat.info_nce against the installed info-nce-pytorch: same signatures, same
values and gradients on the same inputs (float64 to 1e-12, float32 to 2e-5, relative to the
reference's scale), the peer's input checks, and patch / unpatch of its module."""
import inspect

import pytest
import torch

from fastcontrast.cli.bench import benchmarks_package
from tests._helpers import assert_close

benchmarks_package()  # fastcontrast.benchmarks, installed or from the checkout
from fastcontrast.benchmarks import peers  # noqa: E402

from fastcontrast.compat import info_nce as compat  # noqa: E402

from ._parity import PARITY  # noqa: E402


@pytest.fixture(scope="module")
def peer():
    cls, reason = peers.load_peer("info-nce-pytorch")
    if cls is None:
        pytest.skip(reason)
    import info_nce

    return info_nce


def _negatives(mode, n, m, d, dtype):
    if mode is None:
        return None
    shape = (m, d) if mode == "unpaired" else (n, m, d)
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


def _loss_and_grads(fn, inputs, **options):
    loss = fn(*inputs, **options)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    leaves = [t for t in (*inputs, options.get("temperature")) if isinstance(t, torch.Tensor)]
    return loss, torch.autograd.grad((loss * weights).sum(), leaves)


def _assert_parity(ours, theirs, dtype, what):
    (loss, grads), (ref_loss, ref_grads) = ours, theirs
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape, what
    assert_close(loss, ref_loss, dtype, f"{what} loss", tolerances=PARITY)
    for i, (g, ref) in enumerate(zip(grads, ref_grads)):
        assert_close(g, ref, dtype, f"{what} grad {i}", tolerances=PARITY)


def test_signatures_are_the_peers(peer):
    for name in ("info_nce",):
        assert inspect.signature(getattr(compat, name)) == inspect.signature(getattr(peer, name))
    assert inspect.signature(compat.InfoNCE) == inspect.signature(peer.InfoNCE)
    assert (inspect.signature(compat.InfoNCE.forward)
            == inspect.signature(peer.InfoNCE.forward))
    assert compat.InfoNCE().temperature == 0.1


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n,m,d", [(1, 1, 3), (257, 5, 3), (6, 9, 17)])
@pytest.mark.parametrize("mode", [None, "unpaired", "paired"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_values_and_gradients_match(peer, dtype, n, m, d, mode, reduction):
    q = torch.randn(n, d, dtype=dtype, requires_grad=True)
    p = (q.detach() + 0.5 * torch.randn(n, d, dtype=dtype)).requires_grad_()
    neg = _negatives(mode, n, m, d, dtype)
    inputs = (q, p) if neg is None else (q, p, neg)
    options = dict(reduction=reduction, negative_mode=mode or "unpaired")
    for temperature in (0.1, torch.tensor(0.37, dtype=dtype, requires_grad=True)):
        ours = _loss_and_grads(compat.info_nce, inputs, temperature=temperature, **options)
        theirs = _loss_and_grads(peer.info_nce, inputs, temperature=temperature, **options)
        _assert_parity(ours, theirs, dtype, f"info_nce {mode} {reduction} tau={temperature}")
    module_ours = _loss_and_grads(compat.InfoNCE(0.05, reduction, mode or "unpaired"), inputs)
    module_theirs = _loss_and_grads(peer.InfoNCE(0.05, reduction, mode or "unpaired"), inputs)
    _assert_parity(module_ours, module_theirs, dtype, f"InfoNCE {mode} {reduction}")


def test_explicit_negatives_replace_the_in_batch_ones(peer):
    """With negatives, the other rows' positive keys are not candidates (the issue's 2.56 vs
    5.58): the loss does not change when those keys change."""
    q, p = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    neg = torch.randn(8, 5, 4, dtype=torch.float64)
    loss = compat.InfoNCE(negative_mode="paired")(q, p, neg)
    other = p.clone()
    other[1:] = torch.randn(7, 4, dtype=torch.float64)
    row0 = compat.info_nce(q, other, neg, reduction="none", negative_mode="paired")[0]
    assert float(row0) == pytest.approx(float(compat.info_nce(
        q, p, neg, reduction="none", negative_mode="paired")[0]), abs=1e-14)
    assert float(loss) == pytest.approx(float(peer.InfoNCE(negative_mode="paired")(q, p, neg)),
                                        abs=1e-13)


def test_edge_cases_match(peer):
    """Zero vectors (normalised to 0, as torch's F.normalize), zero negatives (loss 0),
    temperature as an int, attributes changed after construction, negative_mode ignored
    without negatives."""
    q = torch.randn(4, 3, dtype=torch.float64)
    q[1] = 0
    p = torch.randn(4, 3, dtype=torch.float64)
    p[2] = 0
    cases = [((q, p), dict(temperature=1)),
             ((q, p, torch.randn(6, 3, dtype=torch.float64)), {}),
             ((q, p, torch.zeros(0, 3, dtype=torch.float64)), dict(reduction="none")),
             ((q, p, torch.zeros(4, 0, 3, dtype=torch.float64)), dict(negative_mode="paired")),
             ((q, p), dict(negative_mode="no such mode"))]
    for inputs, options in cases:
        leaves = [t.clone().requires_grad_() for t in inputs]
        ours = _loss_and_grads(compat.info_nce, leaves, **options)
        theirs = _loss_and_grads(peer.info_nce, leaves, **options)
        _assert_parity(ours, theirs, torch.float64, f"edge case {options}")
    module = compat.InfoNCE()
    module.temperature, module.reduction = 0.5, "sum"
    assert float(module(q, p)) == pytest.approx(float(peer.info_nce(q, p, temperature=0.5,
                                                                   reduction="sum")), rel=1e-13)


def _x(*shape):
    return torch.randn(*shape)


# (arguments, options, the words our message must contain); the peer raises ValueError too.
PEER_CHECKS = [
    ((_x(4), _x(4, 3)), {}, "query must be 2-D"),
    ((_x(4, 3), _x(2, 4, 3)), {}, "positive_key must be 2-D"),
    ((_x(4, 3), _x(4, 3), _x(2, 4, 3)), {}, "negative_keys must be 2-D (M, D)"),
    ((_x(4, 3), _x(4, 3), _x(4, 3)), dict(negative_mode="paired"), "negative_keys must be 3-D"),
    ((_x(4, 3), _x(5, 3)), {}, "positive_key must have as many rows as query (N = 4"),
    ((_x(4, 3), _x(4, 3), _x(3, 2, 3)), dict(negative_mode="paired"),
     "paired negative_keys must have N = 4 rows"),
    ((_x(4, 3), _x(4, 2)), {}, "positive_key must have feature dimension D = 3"),
    ((_x(4, 3), _x(4, 3), _x(6, 2)), {}, "negative_keys must have feature dimension D = 3"),
    ((_x(4, 3), _x(4, 3)), dict(reduction="average"), "reduction must be one of"),
]


@pytest.mark.parametrize("args,options,words", PEER_CHECKS)
def test_bad_inputs_raise_as_the_peer(peer, args, options, words):
    with pytest.raises(ValueError):
        peer.info_nce(*args, **options)
    with pytest.raises(ValueError) as error:
        compat.info_nce(*args, **options)
    assert words in str(error.value)


@pytest.mark.parametrize("args,options,error,words", [
    ((_x(4, 3), _x(4, 3), _x(6, 3)), dict(negative_mode="pairs"), ValueError,
     "negative_mode must be one of 'unpaired', 'paired', got 'pairs'"),
    ((_x(4, 3), _x(4, 3).double()), {}, TypeError, "positive_key must have the dtype of query"),
    ((_x(4, 3), _x(4, 3)), dict(temperature=-0.1), ValueError,
     "temperature must be positive and finite, got -0.1"),
    ((_x(0, 3), _x(0, 3)), {}, ValueError, "query must not be empty"),
    ((_x(4, 3).long(), _x(4, 3)), {}, TypeError, "query must have a floating-point dtype"),
])
def test_where_the_peer_fails_unclearly_the_error_names_the_argument(args, options, error,
                                                                        words):
    with pytest.raises(error) as raised:
        compat.info_nce(*args, **options)
    assert words in str(raised.value)


def test_patch_replaces_and_unpatch_restores(peer):
    import fastcontrast.compat as fcc

    original_class, original_fn = peer.InfoNCE, peer.info_nce
    fcc.patch("info_nce")
    try:
        assert peer.InfoNCE is compat.InfoNCE and peer.info_nce is compat.info_nce
        q, p = torch.randn(5, 3), torch.randn(5, 3)
        assert torch.allclose(peer.InfoNCE()(q, p), original_class()(q, p), rtol=2e-6)
    finally:
        fcc.unpatch("info_nce")
    assert peer.InfoNCE is original_class and peer.info_nce is original_fn
