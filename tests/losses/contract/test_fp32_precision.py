"""float32 precision of the fused CPU losses: at least that of plain PyTorch in float32.

Truth is the float64 reference (fastcontrast.reference). A fused float32 loss or gradient must
be within max(2 x the error of the reference run in float32, a floor) of it. Losses are compared
row by row (reduction "none", the largest error over the rows: the float32 mean of the rows
rounds alike in both and would only add noise); the floor is four float32 ulps of the lse scale
1 / tau + log N (the lse and the positive score a row's loss is the difference of carry that
rounding in any float32 computation, and the host computes the positive score apart from the
kernel's product, so their roundings do not cancel as they do within one logits matrix).
Gradients (of the mean) are compared over all elements against eight ulps of their natural
scale (1 / tau) / N, where the truth may cancel to almost nothing.

The closed-form cases are those a user checks first: equal scores give the log of the count of
candidates, and the loss does not depend on the order of its two views.
"""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc

from ..._helpers import backend_usable
from .._cases import require_every_loss

pytestmark = pytest.mark.skipif(not backend_usable("cpu"), reason="C++ extension unavailable")

EPS = torch.finfo(torch.float32).eps
LOSS_ULPS, GRAD_ULPS = 4, 8
LOSSES = ("info_nce", "clip_loss", "nt_xent", "supcon")
require_every_loss(LOSSES, "fp32 precision", exempt={
    "moco_loss": "info_nce's kernels over a detached queue, checked as info_nce here",
    "siglip_loss": "no log-sum-exp; its fp32 precision: tests/losses/test_siglip.py",
    "distill_info_nce": "its fp32 accuracy: tests/objectives/test_distill.py",
    "distill_clip_loss": "its fp32 accuracy: tests/objectives/test_distill_clip.py"})


def _loss(name, tau, labels=None, normalize=True):
    """fn(tensors, backend, reduction) -> the loss ``name`` at temperature ``tau``."""
    if name == "info_nce":
        return lambda t, b, r="mean": fc.info_nce(t[0], t[1], temperature=tau,
                                                  normalize=normalize, reduction=r, backend=b)
    if name == "clip_loss":  # unit features, as CLIP gives them: logit scale 1 / tau
        return lambda t, b, r="mean": fc.clip_loss(F.normalize(t[0], dim=-1),
                                                   F.normalize(t[1], dim=-1), 1 / tau,
                                                   reduction=r, backend=b)
    if name == "nt_xent":
        return lambda t, b, r="mean": fc.nt_xent(t[0], t[1], temperature=tau,
                                                 normalize=normalize, reduction=r, backend=b)
    return lambda t, b, r="mean": fc.supcon(t[0], labels, temperature=tau, normalize=normalize,
                                            reduction=r, backend=b)


def _run(fn, tensors, backend, dtype):
    """(per-row losses, gradients of the mean loss) in float64 of fn on copies of ``tensors``
    in ``dtype``."""
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in tensors]
    rows = fn(leaves, backend, "none")
    fn(leaves, backend).backward()
    return rows.detach().double(), [leaf.grad.double() for leaf in leaves]


def _errors(fn, tensors, grad_scale):
    """(loss error, gradient error) of the fused float32 run and of the reference float32 run,
    against the float64 reference: the largest absolute error over the rows for the loss,
    max-abs over grad_scale for the gradients."""
    truth, truth_grads = _run(fn, tensors, "reference", torch.float64)
    out = []
    for backend in ("cpu", "reference"):
        loss, grads = _run(fn, tensors, backend, torch.float32)
        grad_error = max(float((g - t).abs().max()) for g, t in zip(grads, truth_grads))
        out.append((float((loss - truth).abs().max()), grad_error / grad_scale))
    return out


def _loss_floor(tau, n):
    """LOSS_ULPS float32 ulps of the scale of an lse over n scores of magnitude up to 1 / tau."""
    return LOSS_ULPS * EPS * (max(1.0, 1 / tau) + math.log(max(n, 2)))


def _assert_as_accurate(fn, tensors, tau, n, label):
    (loss_fused, grad_fused), (loss_torch, grad_torch) = _errors(fn, tensors, (1 / tau) / n)
    loss_floor = _loss_floor(tau, n)
    assert loss_fused <= max(2 * loss_torch, loss_floor), (
        f"{label}: loss error {loss_fused:.3g}, float32 PyTorch {loss_torch:.3g}")
    assert grad_fused <= max(2 * grad_torch, GRAD_ULPS * EPS), (
        f"{label}: gradient error {grad_fused:.3g}, float32 PyTorch {grad_torch:.3g}")


def _pair(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, dtype=torch.float64, generator=g)
    return a, a + 0.5 * torch.randn(n, d, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("tau", [0.05, 0.3, 1.0, 2.0])
def test_fused_fp32_loss_and_grads_as_accurate_as_pytorch_fp32(name, tau):
    """A grid of N (odd sizes, one row block or several) and D (1-d features included) per loss
    and temperature."""
    for n, d in itertools.product((2, 7, 97, 300), (1, 3, 64)):
        a, b = _pair(n, d, seed=n * 100 + d)
        labels = torch.randint(0, max(1, n // 3), (n,), generator=torch.Generator().manual_seed(n))
        tensors = [a] if name == "supcon" else [a, b]
        rows = 2 * n if name == "nt_xent" else n
        fn = _loss(name, tau, labels)
        if d == 1:  # unit 1-d features have zero gradient: compare the losses only
            (loss_fused, _), (loss_torch, _) = _errors(fn, tensors, 1.0)
            assert loss_fused <= max(2 * loss_torch, _loss_floor(tau, rows)), (
                name, tau, n, loss_fused, loss_torch)
            continue
        _assert_as_accurate(fn, tensors, tau, rows, f"{name} tau={tau} n={n} d={d}")


@pytest.mark.parametrize("spread", [1.0, 1e3])
def test_supcon_gram_gradient_as_accurate_as_pytorch_fp32(spread):
    """SupCon without normalisation at tau = 0.01, row norms over three decades (spread 1e3):
    the symmetric-Gram kernel's gradient (and loss) against plain PyTorch float32."""
    g = torch.Generator().manual_seed(1500)
    n, d, tau = 1500, 32, 0.01
    z = torch.randn(n, d, dtype=torch.float64, generator=g)
    z = F.normalize(z, dim=-1) * spread ** torch.rand(n, 1, dtype=torch.float64, generator=g)
    z = z / spread ** 0.5 / 3  # scores up to ~ 0.1 * spread / tau
    labels = torch.randint(0, 50, (n,), generator=g)
    fn = _loss("supcon", tau, labels, normalize=False)
    _assert_as_accurate(fn, [z], tau, n, f"supcon gram spread={spread}")


# -- closed forms ------------------------------------------------------------------------------

def _close(value, expected):
    """Within 2 float32 ulps of ``expected`` (relative, 2.4e-7)."""
    assert abs(float(value) - expected) <= 2 * EPS * abs(expected), (float(value), expected)


@pytest.mark.parametrize("n", [2, 3, 16])
def test_nt_xent_equal_features_give_log_of_candidates(n):
    """All 2n views equal at tau = 1: every logit is 1 and each row has 2n - 1 candidates, so
    the loss is log(2n - 1) (log 3 for two pairs)."""
    z = torch.ones(n, 5) / math.sqrt(5)
    _close(fc.nt_xent(z, z.clone(), temperature=1.0, backend="cpu"), math.log(2 * n - 1))


@pytest.mark.parametrize("tau", [0.5, 1.0])
def test_nt_xent_orthogonal_features(tau):
    """View i of both halves is basis vector e_i: row i's positive scores 1 / tau, its 2(n - 1)
    other candidates 0, so loss = log(1 + 2 (n - 1) exp(-1 / tau))."""
    n = 4
    z = torch.eye(n)
    _close(fc.nt_xent(z, z.clone(), temperature=tau, backend="cpu"),
           math.log1p(2 * (n - 1) * math.exp(-1 / tau)))


@pytest.mark.parametrize("n", [2, 5, 64])
def test_equal_features_give_log_of_count_for_every_loss(n):
    z = torch.ones(n, 3) / math.sqrt(3)
    _close(fc.info_nce(z, z.clone(), temperature=1.0, backend="cpu"), math.log(n))
    _close(fc.clip_loss(z, z.clone(), 1.0, backend="cpu"), math.log(n))
    _close(fc.supcon(z, torch.zeros(n, dtype=torch.long), temperature=1.0, backend="cpu"),
           math.log(n - 1))


@pytest.mark.parametrize("name", ["nt_xent", "info_nce", "clip_loss"])
@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_swapping_views_keeps_the_loss_for_1d_features(name, tau):
    """loss(a, b) == loss(b, a) (to an ulp) for 1-d features, where the unit features are +-1
    and the scores +-1 / tau: NT-Xent and CLIP are symmetric in their views; for InfoNCE the
    score matrix is transposed, which with +-1 features has the same row sums."""
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(8, 1, generator=g), torch.randn(8, 1, generator=g)
    b[:4] = a[:4]  # equal signs on half the pairs
    fn = _loss(name, tau)
    if name == "info_nce":
        b = a.clone()
    ab, ba = fn([a, b], "cpu"), fn([b, a], "cpu")
    assert abs(float(ab) - float(ba)) <= 2 * EPS * abs(float(ab)), (float(ab), float(ba))
    (loss_fused, _), (loss_torch, _) = _errors(fn, [a, b], 1.0)
    assert loss_fused <= max(2 * loss_torch, _loss_floor(tau, 16))
