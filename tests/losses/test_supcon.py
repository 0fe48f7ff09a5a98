"""supcon (Khosla et al.'s L_out, one or several views): every fused backend against the float64
reference (values and gradients, temperature included), the reference against L_out written
out anchor by anchor, the symmetric-Gram path against the full-product path, the positive term
(fastcontrast/_supcon_positives.py) on its own, the SupConLoss module and bad input. The
properties every loss shares: tests/losses/contract/.

The positive term: each anchor's mean positive score against a dense float64 construction, its
gradients by gradcheck in float64 (for the features and the scale, normalised or not, with a row
under the eps clamp) and against autograd over the dense construction for float32 inputs."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastcontrast
from fastcontrast._supcon_positives import normalized_rows, supcon_positive_means
from fastcontrast._host import class_index as _class_index
from fastcontrast.reference import nt_xent_reference, supcon_reference

from .._helpers import FUSED_BACKENDS, backend_usable, device_for
from ._cases import (DTYPES, GRAM_BACKENDS, assert_gram_same, check_against_reference,
                     gram_and_baseline, leaf, raises_clear_error, skip_unavailable,
                     skip_unsupported)


def _labels(n, n_classes, device):
    labels = torch.randint(0, n_classes, (n,), device=device)
    labels[0] = 10**9  # a singleton class: an anchor without positives (large ids are fine)
    return labels


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["N1xD3", "N37xD64", "N257xD1000", "N9xV3xD16", "N40xV2xD5"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_supcon_matches_reference(backend, layout, dtype):
    dims = [int(part[1:]) for part in layout.split("x")]
    n, d = dims[0], dims[-1]
    views = dims[1] if len(dims) == 3 else None
    skip_unsupported(backend, dtype, n * (views or 1) * d)
    device = device_for(backend)
    features = leaf(*([n, views, d] if views else [n, d]), dtype=dtype, device=device)
    labels = None if views and n % 2 else _labels(n, 4, device)
    tau = torch.tensor(0.1, dtype=torch.float64, device=device, requires_grad=True)
    check_against_reference(
        backend,
        dtype,
        lambda f, t, backend: fastcontrast.supcon(f, labels, temperature=t, backend=backend),
        lambda f, t: supcon_reference(f, labels, temperature=t),
        [features, tau],
        max_logit=10.0,
    )


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_supcon_reductions_and_multiview_shape(backend, reduction):
    skip_unsupported(backend, torch.float32, 24 * 8)
    device = device_for(backend)
    features = leaf(12, 2, 8, dtype=torch.float32, device=device)
    labels = _labels(12, 3, device)
    loss = fastcontrast.supcon(features, labels, reduction=reduction, backend=backend)
    assert loss.shape == ((12, 2) if reduction == "none" else ())
    check_against_reference(
        backend,
        torch.float32,
        lambda f, backend: fastcontrast.supcon(f, labels, reduction=reduction, backend=backend),
        lambda f: supcon_reference(f, labels, reduction=reduction),
        [features],
        reduction=reduction,
    )


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_supcon_without_any_positive_is_zero_not_nan(backend):
    if not backend_usable(backend):
        pytest.skip(f"backend {backend!r} unavailable here")
    features = torch.randn(5, 4, requires_grad=True)
    loss = fastcontrast.supcon(features, torch.arange(5), backend=backend)
    (grad,) = torch.autograd.grad(loss, features)
    assert float(loss) == 0.0 and torch.equal(grad, torch.zeros_like(grad))


def test_supcon_reference_is_khosla_l_out():
    """L_out written anchor by anchor, positive by positive."""
    f = F.normalize(torch.randn(7, 3, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3])
    s = f @ f.T / 0.2
    total, anchors = 0.0, 0
    for a in range(7):
        positives = [p for p in range(7) if p != a and labels[p] == labels[a]]
        if not positives:
            continue
        log_denominator = math.log(sum(math.exp(s[a, b]) for b in range(7) if b != a))
        total += -sum(float(s[a, p]) - log_denominator for p in positives) / len(positives)
        anchors += 1
    assert abs(float(supcon_reference(f, labels, temperature=0.2)) - total / anchors) < 1e-12


def test_supcon_with_unique_labels_over_views_is_nt_xent():
    """Two views, each sample its own class: SupCon is NT-Xent."""
    z1, z2 = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    supcon = fastcontrast.supcon(torch.stack([z1, z2], dim=1), temperature=0.5, backend="torch")
    assert abs(float(supcon - nt_xent_reference(z1, z2, temperature=0.5))) < 1e-12


def test_module_equals_functional():
    features, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.allclose(
        fastcontrast.SupConLoss(0.2)(features, labels),
        fastcontrast.supcon(features, labels, temperature=0.2),
    )


# ---------------------------------------------------------------------------------------------
# The symmetric-Gram path (FASTCONTRAST_GRAM) against the full-product path


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("backend", GRAM_BACKENDS)
@pytest.mark.usefixtures("small_gram_blocks")
def test_supcon_gram_equals_baseline(backend, reduction, normalize, configure):
    skip_unavailable(backend)
    torch.manual_seed(2)
    features = torch.randn(13, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2, 2, 4, 1, 0, 5])  # 4 and 5: no positive
    tau = torch.tensor(0.2, dtype=torch.float64)

    def fn(f, t):
        return fastcontrast.supcon(f, labels, temperature=t, reduction=reduction,
                                   normalize=normalize, backend=backend)

    gram, base = gram_and_baseline(configure, fn, [features, tau])
    assert_gram_same(gram, base, 1e-11, 1e-11)


@pytest.mark.parametrize("backend", GRAM_BACKENDS)
@pytest.mark.usefixtures("small_gram_blocks")
def test_gram_gradcheck(backend):
    skip_unavailable(backend)
    torch.manual_seed(4)
    dt = torch.float64
    tau = torch.tensor(0.5, dtype=dt, requires_grad=True)
    f = torch.randn(9, 3, dtype=dt, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 3, 1])

    def fn(x, t):
        return fastcontrast.supcon(x, labels, temperature=t, backend=backend)

    inputs = [f, tau]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The positive term on its own


def _dense_positive_means(x, scale, labels, normalize, eps):
    """mean over b != a with labels[b] == labels[a] of scale <z_a, z_b> (0 without positives)."""
    z = x / x.norm(dim=1, keepdim=True).clamp_min(eps) if normalize else x
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    scores = scale * (z @ z.T)
    count = same.sum(dim=1)
    return torch.where(same, scores, torch.zeros_like(scores)).sum(dim=1) / count.clamp_min(1)


def _call(x, scale, labels, normalize, eps):
    cls = _class_index(labels)
    sizes = torch.bincount(cls, minlength=x.shape[0])[cls]
    z = normalized_rows(x, eps, "test") if normalize else x
    return supcon_positive_means(z, scale, cls, sizes, backend="test")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("n,d,classes", [(1, 3, 1), (2, 3, 1), (9, 3, 4), (257, 16, 30),
                                         (64, 1000, 3)])
def test_values_match_dense_float64(n, d, classes, normalize):
    gen = torch.Generator().manual_seed(n * 1000 + d)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, classes, (n,), generator=gen) * 7 - 5
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    got = _call(x, scale, labels, normalize, 1e-12)
    want = _dense_positive_means(x, scale, labels, normalize, 1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_features_and_scale(normalize):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(11, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 0, 3, 2, 2, 0, 4])
    torch.autograd.gradcheck(lambda a, s: _call(a, s, labels, normalize, 1e-12), (x, scale))


def test_gradcheck_row_under_the_eps_clamp():
    # Row 1 has norm 0.1 < eps = 0.5: z = x / eps there, linear in x.
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    x[1] = x[1] / x[1].norm() * 0.1
    x.requires_grad_()
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 0, 1, 2])
    torch.autograd.gradcheck(lambda a, s: _call(a, s, labels, True, 0.5), (x, scale))


def test_zero_row_has_finite_gradient_equal_to_dense():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    x[2] = 0
    labels = torch.tensor([0, 1, 0, 0, 1, 2, 2])
    scale = torch.tensor(5.0, dtype=torch.float64)
    u = torch.randn(7, generator=gen, dtype=torch.float64)
    a = x.clone().requires_grad_()
    (u * _call(a, scale, labels, True, 1e-12)).sum().backward()
    b = x.clone().requires_grad_()
    (u * _dense_positive_means(b, scale, labels, True, 1e-12)).sum().backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_float32_gradients_match_dense_float64(normalize):
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(300, 37, generator=gen) * 4
    labels = torch.randint(0, 12, (300,), generator=gen)
    u = torch.randn(300, generator=gen)
    s32 = torch.tensor(1 / 0.05, requires_grad=True)
    a = x.clone().requires_grad_()
    (u * _call(a, s32, labels, normalize, 1e-12)).sum().backward()
    s64 = torch.tensor(1 / 0.05, dtype=torch.float64, requires_grad=True)
    b = x.double().requires_grad_()
    (u.double() * _dense_positive_means(b, s64, labels, normalize, 1e-12)).sum().backward()
    atol = 2e-4 * b.grad.abs().max().item()
    torch.testing.assert_close(a.grad, b.grad.float(), rtol=2e-4, atol=atol)
    torch.testing.assert_close(s32.grad, s64.grad.float(), rtol=2e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input

BAD_CALLS = {
    "supcon_no_labels": (lambda: fastcontrast.supcon(torch.randn(4, 3)), ValueError, "labels"),
    "supcon_label_dtype": (
        lambda: fastcontrast.supcon(torch.randn(4, 3), torch.zeros(4)),
        TypeError,
        "labels must have dtype torch.int64",
    ),
    "supcon_label_shape": (
        lambda: fastcontrast.supcon(torch.randn(4, 3), torch.zeros(3, dtype=torch.int64)),
        ValueError,
        r"labels must have shape \(4,\)",
    ),
    "supcon_1d": (
        lambda: fastcontrast.supcon(torch.randn(4), torch.zeros(4, dtype=torch.int64)),
        ValueError,
        "features must be 2-D or 3-D",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_clear_error(name):
    raises_clear_error(BAD_CALLS[name])
