"""nt_xent (with DCL / DCLW / HCL), supcon and moco_loss on every fused backend against the
float64 references (values and gradients, temperature included), plus the references against
the papers' own formulations written out literally."""

import math

import pytest
import torch
import torch.nn.functional as F

import fastcontrast
from fastcontrast.reference import info_nce_reference, nt_xent_reference, supcon_reference

from .._helpers import (
    FUSED_BACKENDS,
    as_float64,
    assert_close,
    backend_usable,
    device_for,
    interpreting_triton,
)

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
OBJECTIVES = {
    "plain": dict(),
    "dcl": dict(decoupled=True),
    "dclw": dict(decoupled=True, dclw_sigma=0.5),
    "hcl": dict(hcl_beta=1.0, hcl_tau_plus=0.1),
    "hcl_debias_only_decoupled": dict(hcl_beta=0.0, hcl_tau_plus=0.05, decoupled=True),
}


def _skip(backend, dtype, size):
    if not backend_usable(backend, device_for(backend)):
        pytest.skip(f"backend {backend!r} unavailable here")
    if backend == "triton":
        if dtype == torch.float64:
            pytest.skip("triton kernels do not take float64")
        if interpreting_triton(backend) and (
            size > 64 * 64 or dtype == torch.bfloat16 and size > 8 * 64
        ):
            pytest.skip("the Triton interpreter runs only small shapes")


def _rand(*shape, dtype, device, scale=1.0):
    t = torch.randn(*shape, dtype=torch.float64) * scale
    return t.to(dtype=dtype, device=device).requires_grad_(True)


def _check(backend, dtype, fused_fn, reference_fn, inputs, *, max_logit=0.0, reduction="mean"):
    """Loss and gradients of fused_fn(backend) vs reference_fn in float64 (and in dtype as the
    baseline of the low-precision error)."""
    weight = None

    def run(fn, tensors):
        loss = fn(*tensors)
        total = loss.sum() * 1.5 if reduction != "none" else (loss * weight.to(loss.dtype)).sum()
        return loss, torch.autograd.grad(total, [t for t in tensors if t.requires_grad])

    ref_in = as_float64(*inputs)
    if reduction == "none":
        weight = torch.rand(
            reference_fn(*ref_in).shape, dtype=torch.float64, device=inputs[0].device
        )
    loss, grads = run(lambda *t: fused_fn(*t, backend=backend), inputs)
    ref_loss, ref_grads = run(reference_fn, ref_in)
    low = dtype in (torch.float16, torch.bfloat16)
    base_loss, base_grads = run(reference_fn, inputs) if low else (None, [None] * len(grads))
    assert loss.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss", max_logit=max_logit, baseline=base_loss)
    for i, (g, r, b) in enumerate(zip(grads, ref_grads, base_grads)):
        assert g.dtype == inputs[i].dtype
        scale = None
        if inputs[i].dim() == 0:  # d tau = -(1/tau) sum dS s cancels: rounding ~ max|s| / tau
            scale = max(1.0, float(r.abs()), max_logit / float(inputs[i]))
        assert_close(g, r, dtype, f"grad[{i}]", max_logit=max_logit, baseline=b, scale=scale)


# ---------------------------------------------------------------------------------------------
# nt_xent


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape", [(2, 3), (7, 64), (129, 1000)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("objective", list(OBJECTIVES))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_nt_xent_matches_reference(backend, objective, shape, dtype):
    n, d = shape
    _skip(backend, dtype, n * d)
    device = device_for(backend)
    z1, z2 = _rand(n, d, dtype=dtype, device=device), _rand(n, d, dtype=dtype, device=device)
    tau = torch.tensor(0.2, dtype=torch.float64, device=device, requires_grad=True)
    opts = OBJECTIVES[objective]
    _check(
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
    _skip(backend, torch.float32, 33 * 16)
    device = device_for(backend)
    z1, z2 = (_rand(33, 16, dtype=torch.float32, device=device) for _ in range(2))
    opts = OBJECTIVES[objective]
    _check(
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
    _skip(backend, torch.float32, 17 * 8)
    device = device_for(backend)
    z1, z2 = (_rand(17, 8, dtype=torch.float32, device=device, scale=scale) for _ in range(2))
    opts = dict(OBJECTIVES[objective], normalize=False, temperature=tau)
    max_logit = float((torch.cat([z1, z2]).detach().double().norm(dim=1).max() ** 2) / tau)
    _check(
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


# ---------------------------------------------------------------------------------------------
# supcon


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
    _skip(backend, dtype, n * (views or 1) * d)
    device = device_for(backend)
    features = _rand(*([n, views, d] if views else [n, d]), dtype=dtype, device=device)
    labels = None if views and n % 2 else _labels(n, 4, device)
    tau = torch.tensor(0.1, dtype=torch.float64, device=device, requires_grad=True)
    _check(
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
    _skip(backend, torch.float32, 24 * 8)
    device = device_for(backend)
    features = _rand(12, 2, 8, dtype=torch.float32, device=device)
    labels = _labels(12, 3, device)
    loss = fastcontrast.supcon(features, labels, reduction=reduction, backend=backend)
    assert loss.shape == ((12, 2) if reduction == "none" else ())
    _check(
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


# ---------------------------------------------------------------------------------------------
# moco_loss


class _QueueLike:
    """The part of NegativeQueue's interface that moco_loss uses."""

    def __init__(self, keys, indices=None):
        self.keys, self.indices = keys, indices

    def negatives(self):
        return self.keys

    def stored_indices(self):
        return self.indices


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_ids", [False, True], ids=["queue", "queue+ids"])
@pytest.mark.parametrize(
    "shape", [(1, 5, 3), (8, 70, 64), (37, 300, 128)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_moco_loss_matches_reference(backend, shape, with_ids, dtype):
    n, k, d = shape
    _skip(backend, dtype, max(n, 64) * d)
    device = device_for(backend)
    query = _rand(n, d, dtype=dtype, device=device)
    key = torch.randn(n, d, dtype=torch.float64).to(dtype=dtype, device=device)  # no grad (MoCo)
    queue_keys = torch.randn(k, d, dtype=torch.float64).to(dtype=dtype, device=device)
    index = torch.randint(0, 2 * n, (n,), device=device) if with_ids else None
    stored = torch.randint(-1, 2 * n, (k,), device=device) if with_ids else None
    queue = _QueueLike(queue_keys, stored)

    def reference(q, t):
        return info_nce_reference(
            q,
            key.to(q.dtype),
            queue_keys.to(q.dtype),
            temperature=t,
            in_batch_negatives=False,
            query_ids=index,
            negative_ids=stored,
        )

    tau = torch.tensor(0.07, dtype=torch.float64, device=device, requires_grad=True)
    _check(
        backend,
        dtype,
        lambda q, t, backend: fastcontrast.moco_loss(
            q, key, queue, temperature=t, query_index=index, backend=backend
        ),
        reference,
        [query, tau],
        max_logit=1 / 0.07,
    )


HCL_WITH_IDS = {  # (decoupled, in_batch_negatives); decoupled with in-batch keys refuses ids
    "in_batch": (False, True),
    "bank_only": (False, False),
    "bank_only_decoupled": (True, False),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("beta,tau_plus", [(0.5, 0.1), (0.5, 0.0), (0.0, 0.1)])
@pytest.mark.parametrize("layout", list(HCL_WITH_IDS))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_hcl_with_query_ids_matches_reference(backend, layout, beta, tau_plus, dtype, reduction):
    """HCL over a bank with repeated query ids: the bank entries of the query's id are neither
    in the negatives' log-sum-exps nor in the count n_i (as info_nce_reference)."""
    decoupled, in_batch = HCL_WITH_IDS[layout]
    n, k, d = 6, 5, 8
    _skip(backend, dtype, max(n, 64) * d)
    device = device_for(backend)
    query, key, bank = (_rand(m, d, dtype=dtype, device=device) for m in (n, n, k))
    # Rows 0 and 1 share id 0 (bank entries 0 and 2), row 2 owns entry 1, id -1 masks nothing.
    query_ids = torch.tensor([0, 0, 1, -1, 2, 5], device=device)
    bank_ids = torch.tensor([0, 1, 0, -1, 2], device=device)
    tau = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    opts = dict(hcl_beta=beta, hcl_tau_plus=tau_plus, decoupled=decoupled,
                in_batch_negatives=in_batch, query_ids=query_ids, negative_ids=bank_ids,
                reduction=reduction)
    _check(
        backend,
        dtype,
        lambda q, kk, b, t, backend: fastcontrast.info_nce(
            q, kk, b, temperature=t, backend=backend, **opts),
        lambda q, kk, b, t: info_nce_reference(q, kk, b, temperature=t, **opts),
        [query, key, bank, tau],
        max_logit=1 / 0.3,
        reduction=reduction,
    )


def test_moco_loss_is_classic_concat_logits():
    """MoCo's published loss: logits [l_pos, l_neg] / tau, cross-entropy with label 0."""
    q, k = (F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1) for _ in range(2))
    queue = F.normalize(torch.randn(50, 8, dtype=torch.float64), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.07
    expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.int64))
    for backend in ("torch", "cpu", "reference"):
        if backend_usable(backend):
            got = fastcontrast.moco_loss(q, k, queue, backend=backend)
            assert abs(float(got - expected)) < 1e-10, backend


def test_moco_same_instance_negatives_are_excluded():
    """A queue entry stored with the query's index is not a negative: identical to dropping it."""
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    keys = torch.randn(6, 4, dtype=torch.float64)
    stored = torch.tensor([5, 0, 7, 1, -1, 0])  # query 0 has entries 1 and 5, query 1 entry 3
    index = torch.tensor([0, 1, 2])
    got = fastcontrast.moco_loss(
        q, k, _QueueLike(keys, stored), query_index=index, reduction="none", backend="torch"
    )
    for i, drop in enumerate([[1, 5], [3], []]):
        keep = [j for j in range(6) if j not in drop]
        expected = fastcontrast.moco_loss(
            q[i : i + 1], k[i : i + 1], keys[keep], backend="reference"
        )
        assert abs(float(got[i] - expected)) < 1e-12


# ---------------------------------------------------------------------------------------------
# gradcheck (float64) and modules


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_loss_family(backend):
    if not backend_usable(backend):
        pytest.skip(f"backend {backend!r} unavailable here")

    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    z1, z2, tau = rnd(4, 3), rnd(4, 3), torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    check = dict(eps=1e-6, atol=1e-7, rtol=1e-5)  # no nondet_tol: backward is deterministic
    for opts in OBJECTIVES.values():
        assert torch.autograd.gradcheck(
            lambda a, b, t: fastcontrast.nt_xent(a, b, temperature=t, backend=backend, **opts),
            (z1, z2, tau),
            **check,
        )
    features, labels = rnd(6, 2, 3), torch.tensor([0, 1, 0, 2, 1, 1])
    assert torch.autograd.gradcheck(
        lambda f, t: fastcontrast.supcon(f, labels, temperature=t, backend=backend),
        (features, tau),
        **check,
    )
    q, k, queue = rnd(3, 4), rnd(3, 4), rnd(7, 4)
    ids = (torch.tensor([0, 1, 2]), torch.tensor([1, -1, 0, 2, 2, 5, 6]))
    assert torch.autograd.gradcheck(
        lambda a, b, c, t: fastcontrast.info_nce(
            a,
            b,
            c,
            temperature=t,
            in_batch_negatives=False,
            query_ids=ids[0],
            negative_ids=ids[1],
            hcl_beta=0.5,
            backend=backend,
        ),
        (q, k, queue, tau),
        **check,
    )


def test_modules_equal_functional():
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
    features, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    assert torch.allclose(
        fastcontrast.SupConLoss(0.2)(features, labels),
        fastcontrast.supcon(features, labels, temperature=0.2),
    )
    q, k, queue = torch.randn(3, 4), torch.randn(3, 4), torch.randn(9, 4)
    assert torch.allclose(
        fastcontrast.MoCoLoss(hcl_beta=0.5)(q, k, queue),
        fastcontrast.moco_loss(q, k, queue, hcl_beta=0.5),
    )


# ---------------------------------------------------------------------------------------------
# bad input

BAD_CALLS = {
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
    "symmetric_dcl": (
        lambda: fastcontrast.info_nce(
            torch.randn(4, 3), torch.randn(4, 3), symmetric=True, decoupled=True
        ),
        ValueError,
        "symmetric",
    ),
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
    "ids_without_bank": (
        lambda: fastcontrast.info_nce(
            torch.randn(4, 3),
            torch.randn(4, 3),
            query_ids=torch.arange(4),
            negative_ids=torch.arange(4),
        ),
        ValueError,
        "shared negatives",
    ),
    "ids_alone": (
        lambda: fastcontrast.info_nce(
            torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 3), query_ids=torch.arange(4)
        ),
        ValueError,
        "given together",
    ),
    "ids_shape": (
        lambda: fastcontrast.info_nce(
            torch.randn(4, 3),
            torch.randn(4, 3),
            torch.randn(6, 3),
            query_ids=torch.arange(4),
            negative_ids=torch.arange(5),
        ),
        ValueError,
        r"negative_ids must have shape \(6,\)",
    ),
    "moco_index_plain_queue": (
        lambda: fastcontrast.moco_loss(
            torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 3), query_index=torch.arange(4)
        ),
        ValueError,
        "NegativeQueue",
    ),
    "moco_queue_dim": (
        lambda: fastcontrast.moco_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 5)),
        ValueError,
        "feature dimension",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_clear_error(case):
    call, error, message = BAD_CALLS[case]
    with pytest.raises(error, match=message):
        call()


def test_moco_loss_with_a_real_negative_queue():
    """The filled part of a NegativeQueue (wrapped around, stored indices) as the negatives."""
    queue = fastcontrast.NegativeQueue(10, 4, dtype=torch.float64, store_indices=True)
    for start in range(0, 14, 3):  # 14 keys through a queue of 10: wraps around
        queue.enqueue(
            torch.randn(3, 4, dtype=torch.float64), indices=torch.arange(start, start + 3)
        )
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, dtype=torch.float64)
    index = torch.tensor([14, 3, 13, 7, 100])
    got = fastcontrast.moco_loss(q, k, queue, query_index=index, reduction="none", backend="torch")
    expected = info_nce_reference(
        q,
        k,
        queue.negatives(),
        in_batch_negatives=False,
        query_ids=index,
        negative_ids=queue.stored_indices(),
        reduction="none",
    )
    assert torch.allclose(got, expected, atol=1e-12)
    with pytest.raises(ValueError, match="store_indices"):
        fastcontrast.moco_loss(
            q, k, fastcontrast.NegativeQueue(4, 4, dtype=torch.float64), query_index=index
        )
