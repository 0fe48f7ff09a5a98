"""nt_xent (SimCLR's NT-Xent, with DCL / DCLW / HCL): every fused backend against the float64
reference (values and gradients, temperature included), the reference against the papers' own
formulations written out literally, the symmetric-Gram path against the full-product path, the
NTXentLoss module and bad input. The properties every loss shares: tests/losses/contract/."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastcontrast
from fastcontrast.infonce import function as fused_function
from fastcontrast.reference import nt_xent_reference

from .._helpers import FUSED_BACKENDS, device_for
from ._cases import (DTYPES, GRAM_BACKENDS, OBJECTIVES, D, N, assert_gram_same,
                     check_against_reference, gram_and_baseline, leaf, raises_clear_error,
                     skip_unavailable, skip_unsupported)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(2, 3), (7, 64), (129, 1000)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_nt_xent_matches_reference(backend, objective, shape, dtype):
    n, d = shape
    skip_unsupported(backend, dtype, n * d)
    device = device_for(backend)
    z1, z2 = leaf(n, d, dtype=dtype, device=device), leaf(n, d, dtype=dtype, device=device)
    tau = torch.tensor(0.2, dtype=torch.float64, device=device, requires_grad=True)
    opts = OBJECTIVES[objective]
    check_against_reference(
        backend,
        dtype,
        lambda a, b, t, backend: fastcontrast.nt_xent(a, b, temperature=t, backend=backend, **opts),
        lambda a, b, t: fastcontrast.nt_xent(a, b, temperature=t, backend="reference", **opts),
        [z1, z2, tau],
        max_logit=5.0,
    )


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("objective", ["plain", "dcl", "hcl"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_nt_xent_reductions(backend, objective, reduction):
    skip_unsupported(backend, torch.float32, 33 * 16)
    device = device_for(backend)
    z1, z2 = (leaf(33, 16, dtype=torch.float32, device=device) for _ in range(2))
    opts = OBJECTIVES[objective]
    check_against_reference(
        backend,
        torch.float32,
        lambda a, b, backend: fastcontrast.nt_xent(
            a, b, reduction=reduction, backend=backend, **opts
        ),
        lambda a, b: fastcontrast.nt_xent(a, b, reduction=reduction, backend="reference", **opts),
        [z1, z2],
        reduction=reduction,
    )


@pytest.mark.parametrize(
    "objective,scale,tau",
    [("plain", 30.0, 0.01), ("dcl", 30.0, 0.01), ("dclw", 30.0, 0.01), ("hcl", 1.5, 0.1)],
)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_nt_xent_tiny_temperature_large_norms(backend, objective, scale, tau):
    """Unnormalised inputs: with tau = 0.01 and norms ~100 the scores reach ~1e4 and must not
    overflow. HCL's reference works on e^s (as the paper), so its scores stay below ~700."""
    skip_unsupported(backend, torch.float32, 17 * 8)
    device = device_for(backend)
    z1, z2 = (leaf(17, 8, dtype=torch.float32, device=device, scale=scale) for _ in range(2))
    opts = dict(OBJECTIVES[objective], normalize=False, temperature=tau)
    max_logit = float((torch.cat([z1, z2]).detach().double().norm(dim=1).max() ** 2) / tau)
    check_against_reference(
        backend,
        torch.float32,
        lambda a, b, backend: fastcontrast.nt_xent(a, b, backend=backend, **opts),
        lambda a, b: fastcontrast.nt_xent(a, b, backend="reference", **opts),
        [z1, z2],
        max_logit=max_logit,
    )


def test_nt_xent_reference_is_simclr_cross_entropy():
    """The 2N x 2N formulation equals SimCLR's per-pair form l(i, j) averaged over both orders."""
    z1, z2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / 0.3
    n = 6
    losses = []
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(sim[i, k]) for k in range(2 * n) if k != i)
        losses.append(-math.log(math.exp(sim[i, j]) / denominator))
    assert abs(float(nt_xent_reference(z1, z2, temperature=0.3)) - sum(losses) / (2 * n)) < 1e-12


def _dcl_paper(z1, z2, tau, sigma=None):
    """The DCL / DCLW loss as in the authors' code: one direction, a 1e-45 mask constant."""
    cross = z1 @ z2.T
    positive = -torch.diag(cross) / tau
    if sigma is not None:
        weight = 2 - z1.shape[0] * torch.softmax((z1 * z2).sum(dim=1) / sigma, dim=0)
        positive = positive * weight
    negatives = torch.cat([z1 @ z1.T, cross], dim=1) / tau
    mask = torch.eye(z1.shape[0], dtype=z1.dtype).repeat(1, 2) * math.log(1e-45)
    return (positive + torch.logsumexp(negatives + mask, dim=1)).mean()


@pytest.mark.parametrize("sigma", [None, 0.5])
def test_dcl_matches_the_papers_code(sigma):
    z1, z2 = (F.normalize(torch.randn(10, 7, dtype=torch.float64), dim=1) for _ in range(2))
    expected = 0.5 * (_dcl_paper(z1, z2, 0.1, sigma) + _dcl_paper(z2, z1, 0.1, sigma))
    got = fastcontrast.nt_xent(
        z1, z2, temperature=0.1, decoupled=True, dclw_sigma=sigma, backend="reference"
    )
    assert abs(float(got - expected)) < 1e-9  # the code's mask leaves e^{-103.6}, not 0


def _hcl_paper(z1, z2, tau, beta, tau_plus):
    """The HCL loss as in the authors' SimCLR code (negatives of row i: all but i and i +- N)."""
    n = z1.shape[0]
    out = torch.cat([z1, z2])
    neg = torch.exp(out @ out.T / tau)
    mask = torch.ones(2 * n, 2 * n, dtype=torch.bool)
    for i in range(n):
        mask[i, i] = mask[i, i + n] = mask[i + n, i] = mask[i + n, i + n] = False
    neg = neg.masked_select(mask).view(2 * n, -1)
    pos = torch.exp((z1 * z2).sum(dim=-1) / tau)
    pos = torch.cat([pos, pos])
    count = 2 * n - 2
    imp = (beta * neg.log()).exp()
    reweight_neg = (imp * neg).sum(dim=-1) / imp.mean(dim=-1)
    ng = (-tau_plus * count * pos + reweight_neg) / (1 - tau_plus)
    ng = torch.clamp(ng, min=count * math.e ** (-1 / tau))
    return (-torch.log(pos / (pos + ng))).mean()


@pytest.mark.parametrize("beta,tau_plus", [(1.0, 0.1), (0.5, 0.0), (0.0, 0.1), (2.0, 0.3)])
def test_hcl_matches_the_papers_code(beta, tau_plus):
    z1, z2 = (F.normalize(torch.randn(9, 6, dtype=torch.float64), dim=1) for _ in range(2))
    expected = _hcl_paper(z1, z2, 0.5, beta, tau_plus)
    for backend in ("reference", "torch"):
        got = fastcontrast.nt_xent(
            z1, z2, temperature=0.5, hcl_beta=beta, hcl_tau_plus=tau_plus, backend=backend
        )
        assert abs(float(got - expected)) < 1e-10, backend


def test_hcl_without_reweighting_is_infonce():
    z1, z2 = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    plain = fastcontrast.nt_xent(z1, z2, temperature=0.5, backend="torch")
    # beta = 0, tau_plus = 0 with the floor inactive (tau large enough) is plain NT-Xent.
    hcl = fastcontrast.nt_xent(z1, z2, temperature=0.5, hcl_beta=1e-12, backend="torch")
    assert abs(float(plain - hcl)) < 1e-9


def test_module_equals_functional():
    z1, z2 = torch.randn(5, 4), torch.randn(5, 4)
    module = fastcontrast.NTXentLoss(0.3, decoupled=True, learn_temperature=True)
    assert torch.allclose(
        module(z1, z2), fastcontrast.nt_xent(z1, z2, temperature=0.3, decoupled=True), atol=1e-6
    )
    module(z1, z2).backward()
    log_inv = torch.tensor(math.log(1 / 0.3), dtype=torch.float64, requires_grad=True)
    fastcontrast.nt_xent(
        z1.double(),
        z2.double(),
        temperature=torch.exp(-log_inv),
        decoupled=True,
        backend="reference",
    ).backward()
    torch.testing.assert_close(
        module.log_inverse_temperature.grad.double(), log_inv.grad, rtol=1e-4, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# The symmetric-Gram path (FASTCONTRAST_GRAM) against the full-product path


GRAM_OBJECTIVES = {"plain": {}, "dcl": dict(decoupled=True),
                   "dclw": dict(decoupled=True, dclw_sigma=0.5),
                   "hcl": dict(hcl_beta=0.5, hcl_tau_plus=0.1)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("objective", list(GRAM_OBJECTIVES))
@pytest.mark.parametrize("backend", GRAM_BACKENDS)
@pytest.mark.usefixtures("small_gram_blocks")
def test_nt_xent_gram_equals_baseline(backend, objective, reduction, dtype, configure):
    skip_unavailable(backend)
    torch.manual_seed(1)
    z1, z2 = torch.randn(9, 5, dtype=dtype), torch.randn(9, 5, dtype=dtype)
    tau = torch.tensor(0.3, dtype=dtype)

    def fn(a, b, t):
        return fastcontrast.nt_xent(a, b, temperature=t, reduction=reduction, backend=backend,
                                    **GRAM_OBJECTIVES[objective])

    gram, base = gram_and_baseline(configure, fn, [z1, z2, tau])
    tol = 1e-11 if dtype == torch.float64 else 2e-5
    assert_gram_same(gram, base, tol, tol)


def _count_gram_calls(monkeypatch):
    calls = []
    original = fused_function.gram_lse_forward

    def counting(*args, **kwargs):
        calls.append(kwargs["backend"])
        return original(*args, **kwargs)

    monkeypatch.setattr(fused_function, "gram_lse_forward", counting)
    return calls


@pytest.mark.parametrize("backend", GRAM_BACKENDS)
@pytest.mark.usefixtures("small_gram_blocks")
def test_the_losses_take_the_gram_path_only_where_the_mask_is_symmetric(backend, monkeypatch,
                                                                       configure):
    skip_unavailable(backend)
    calls = _count_gram_calls(monkeypatch)
    z1, z2 = torch.randn(6, 3), torch.randn(6, 3)
    z = torch.cat([z1, z2])
    targets = (torch.arange(12) + 1) % 12  # a cycle, not an involution
    fastcontrast.nt_xent(z1, z2, backend=backend)
    # NT-Xent's positives: an involution
    fastcontrast.nt_xent(z1, z2, decoupled=True, backend=backend)
    fastcontrast.supcon(z, torch.arange(12) % 3, backend=backend)
    fastcontrast.info_nce(z, z, targets=targets, exclude_self=True, backend=backend)
    assert len(calls) == 4
    fastcontrast.info_nce(z, z, targets=targets, exclude_self=True, decoupled=True,
                          backend=backend)
    fastcontrast.info_nce(z, z.clone(), targets=targets, exclude_self=True, backend=backend)
    fastcontrast.info_nce(z1, z2, backend=backend)
    configure(gram=False)
    fastcontrast.nt_xent(z1, z2, backend=backend)
    assert len(calls) == 4


@pytest.mark.parametrize("loss", ["nt_xent", "nt_xent_dcl"])
@pytest.mark.parametrize("backend", GRAM_BACKENDS)
@pytest.mark.usefixtures("small_gram_blocks")
def test_gram_gradcheck(backend, loss):
    skip_unavailable(backend)
    torch.manual_seed(4)
    dt = torch.float64
    tau = torch.tensor(0.5, dtype=dt, requires_grad=True)
    z1 = torch.randn(5, 3, dtype=dt, requires_grad=True)
    z2 = torch.randn(5, 3, dtype=dt, requires_grad=True)
    opts = dict(decoupled=True) if loss == "nt_xent_dcl" else {}

    def fn(a, b, t):
        return fastcontrast.nt_xent(a, b, temperature=t, backend=backend, **opts)

    inputs = [z1, z2, tau]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input

BAD_CALLS = {
    "nt_xent_labels_as_second_view": (lambda: fastcontrast.NTXentLoss(0.5)(
        torch.randn(N, D), torch.arange(N)), TypeError,
        r"z2 must have a floating-point dtype, got torch.int64: the second argument of nt_xent "
        r"/ NTXentLoss is the second view .* use fastcontrast.supcon / SupConLoss"),
    "nt_xent_shape": (
        lambda: fastcontrast.nt_xent(torch.randn(4, 3), torch.randn(5, 3)),
        ValueError,
        "z2 must have the shape of z1",
    ),
    "nt_xent_dtype": (
        lambda: fastcontrast.nt_xent(torch.randn(4, 3), torch.randn(4, 3).double()),
        TypeError,
        "z2 must have the dtype of z1",
    ),
    "dclw_without_dcl": (
        lambda: fastcontrast.nt_xent(torch.randn(4, 3), torch.randn(4, 3), dclw_sigma=0.5),
        ValueError,
        "decoupled=True",
    ),
    "dclw_sigma_negative": (
        lambda: fastcontrast.nt_xent(
            torch.randn(4, 3), torch.randn(4, 3), decoupled=True, dclw_sigma=-1.0
        ),
        ValueError,
        "dclw_sigma",
    ),
    "hcl_tau_plus_one": (
        lambda: fastcontrast.nt_xent(torch.randn(4, 3), torch.randn(4, 3), hcl_tau_plus=1.0),
        ValueError,
        "hcl_tau_plus",
    ),
    "hcl_beta_negative": (
        lambda: fastcontrast.nt_xent(torch.randn(4, 3), torch.randn(4, 3), hcl_beta=-1.0),
        ValueError,
        "hcl_beta",
    ),
    "hcl_beta_type": (
        lambda: fastcontrast.nt_xent(torch.randn(4, 3), torch.randn(4, 3), hcl_beta="1"),
        TypeError,
        "hcl_beta",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_clear_error(name):
    raises_clear_error(BAD_CALLS[name])
