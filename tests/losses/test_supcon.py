"""SupCon's positive term (fastcontrast/_supcon_positives.py) on its own: each anchor's mean
positive score against a dense float64 construction, its gradients by gradcheck in float64 (for
the features and the scale, normalised or not, with a row under the eps clamp) and against
autograd over the dense construction for float32 inputs."""
import pytest
import torch

from fastcontrast._supcon_positives import normalized_rows, supcon_positive_means
from fastcontrast.infonce import _class_index


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
