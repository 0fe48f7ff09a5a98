"""The losses that compare a set with itself (nt_xent, supcon, info_nce with exclude_self and the
query as key) run on the symmetric-Gram ops, and give what the full-product path gives
(FASTCONTRAST_GRAM=0, the baseline) and the float64 reference: every objective, reduction,
row weights, the temperature gradient, and gradcheck in float64 with blocks forced small."""
import pytest
import torch

import fastcontrast as fc
from fastcontrast.infonce import function as fused_function

from .._helpers import backend_usable

BACKENDS = ["torch", "cpu"]
OBJECTIVES = {"plain": {}, "dcl": dict(decoupled=True), "dclw": dict(decoupled=True,
                                                                    dclw_sigma=0.5),
              "hcl": dict(hcl_beta=0.5, hcl_tau_plus=0.1)}


@pytest.fixture(autouse=True)
def _small_blocks(configure):
    configure(gram_block_rows=4)


def _skip(backend):
    if not backend_usable(backend):
        pytest.skip(f"backend {backend!r} unavailable here")


def _value_and_grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss.sum(), inputs)
    return loss.detach(), grads


def _gram_and_baseline(configure, fn, inputs):
    gram = _value_and_grads(fn, inputs)
    configure(gram=False)
    base = _value_and_grads(fn, inputs)
    configure(gram=True)
    return gram, base


def _assert_same(gram, base, rtol, atol):
    torch.testing.assert_close(gram[0], base[0], rtol=rtol, atol=atol)
    for a, b in zip(gram[1], base[1]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_nt_xent_gram_equals_baseline(backend, objective, reduction, dtype, configure):
    _skip(backend)
    torch.manual_seed(1)
    z1, z2 = torch.randn(9, 5, dtype=dtype), torch.randn(9, 5, dtype=dtype)
    tau = torch.tensor(0.3, dtype=dtype)

    def fn(a, b, t):
        return fc.nt_xent(a, b, temperature=t, reduction=reduction, backend=backend,
                          **OBJECTIVES[objective])

    gram, base = _gram_and_baseline(configure, fn, [z1, z2, tau])
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    _assert_same(gram, base, tol, tol)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_supcon_gram_equals_baseline(backend, reduction, normalize, configure):
    _skip(backend)
    torch.manual_seed(2)
    features = torch.randn(13, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2, 2, 4, 1, 0, 5])  # 4 and 5: no positive
    tau = torch.tensor(0.2, dtype=torch.float64)

    def fn(f, t):
        return fc.supcon(f, labels, temperature=t, reduction=reduction, normalize=normalize,
                         backend=backend)

    gram, base = _gram_and_baseline(configure, fn, [features, tau])
    _assert_same(gram, base, 1e-11, 1e-11)


@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_exclude_self_same_tensor_gram_equals_baseline(backend, configure):
    _skip(backend)
    torch.manual_seed(3)
    z = torch.randn(11, 4, dtype=torch.float64)
    targets = (torch.arange(11) + torch.randint(1, 11, (11,))) % 11  # not an involution
    tau = torch.tensor(0.4, dtype=torch.float64)

    def fn(x, t):
        return fc.info_nce(x, x, temperature=t, targets=targets, exclude_self=True,
                           backend=backend)

    gram, base = _gram_and_baseline(configure, fn, [z, tau])
    _assert_same(gram, base, 1e-11, 1e-11)


def _count_gram_calls(monkeypatch):
    calls = []
    original = fused_function.gram_lse_forward

    def counting(*args, **kwargs):
        calls.append(kwargs["backend"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_function, "gram_lse_forward", counting)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_losses_take_the_gram_path_only_where_the_mask_is_symmetric(backend, monkeypatch,
                                                                       configure):
    _skip(backend)
    calls = _count_gram_calls(monkeypatch)
    z1, z2 = torch.randn(6, 3), torch.randn(6, 3)
    z = torch.cat([z1, z2])
    targets = (torch.arange(12) + 1) % 12  # a cycle, not an involution
    fc.nt_xent(z1, z2, backend=backend)
    fc.nt_xent(z1, z2, decoupled=True, backend=backend)  # NT-Xent's positives: an involution
    fc.supcon(z, torch.arange(12) % 3, backend=backend)
    fc.info_nce(z, z, targets=targets, exclude_self=True, backend=backend)
    assert len(calls) == 4
    fc.info_nce(z, z, targets=targets, exclude_self=True, decoupled=True, backend=backend)
    fc.info_nce(z, z.clone(), targets=targets, exclude_self=True, backend=backend)
    fc.info_nce(z1, z2, backend=backend)
    configure(gram=False)
    fc.nt_xent(z1, z2, backend=backend)
    assert len(calls) == 4


@pytest.mark.parametrize("loss", ["nt_xent", "nt_xent_dcl", "supcon"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_gram_losses_gradcheck(backend, loss):
    _skip(backend)
    torch.manual_seed(4)
    dt = torch.float64
    tau = torch.tensor(0.5, dtype=dt, requires_grad=True)
    if loss == "supcon":
        f = torch.randn(9, 3, dtype=dt, requires_grad=True)
        labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 3, 1])

        def fn(x, t):
            return fc.supcon(x, labels, temperature=t, backend=backend)

        inputs = [f, tau]
    else:
        z1 = torch.randn(5, 3, dtype=dt, requires_grad=True)
        z2 = torch.randn(5, 3, dtype=dt, requires_grad=True)
        opts = dict(decoupled=True) if loss == "nt_xent_dcl" else {}

        def fn(a, b, t):
            return fc.nt_xent(a, b, temperature=t, backend=backend, **opts)

        inputs = [z1, z2, tau]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
