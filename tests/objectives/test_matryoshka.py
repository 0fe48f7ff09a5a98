"""matryoshka_dims / matryoshka_weights of info_nce, clip_loss and nt_xent
(fastcontrast/infonce/matryoshka.py): every backend against the float64 reference (the weighted
sum of separate per-prefix losses), values and gradients; equal to the weighted sum of separate
calls on each backend; the prefix semantics of sentence-transformers' MatryoshkaLoss (each prefix
normalised on its own); odd shapes, dtypes, reductions; argument errors and the combinations
that are refused; the module twins."""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc

from .._helpers import FUSED_BACKENDS, as_float64, assert_close, device_for
# The skip rule and input factories of the objectives' tests (one place for them).
from .test_label_smoothing import BACKENDS, DTYPES, _partner, _rand, _skip


# name -> (loss of (inputs, backend, **matryoshka) -> tensor, inputs of (n, d, dtype, device))
def _info_nce_case(**options):
    def call(t, backend, **extra):
        rest = {k: v for k, v in t.items() if k not in ("query", "key", "negatives")}
        return fc.info_nce(t["query"], t["key"], t.get("negatives"), temperature=0.3,
                           backend=backend, **rest, **options, **extra)
    return call


def _info_nce_inputs(bank=False, targets=None, m_extra=0):
    def make(n, d, dtype, device):
        t = dict(query=_rand(n, d, dtype=dtype, device=device),
                 key=_rand(n + m_extra, d, dtype=dtype, device=device))
        if bank:
            t["negatives"] = _rand(6, d, dtype=dtype, device=device)
        if targets == "random":
            t["targets"] = torch.randint(0, n + m_extra, (n,), device=device)
        elif targets == "partner":
            t["targets"] = _partner(n, device)
        return t
    return make


def _pair(n, d, dtype, device):
    return dict(a=_rand(n, d, dtype=dtype, device=device),
                b=_rand(n, d, dtype=dtype, device=device))


def _clip(t, backend, **extra):
    return fc.clip_loss(t["a"], t["b"], 4.0, backend=backend, **extra)


def _nt_xent(t, backend, **extra):
    return fc.nt_xent(t["a"], t["b"], temperature=0.2, backend=backend, **extra)


CASES = {
    "info_nce": (_info_nce_case(), _info_nce_inputs()),
    "info_nce_grouped_keys": (_info_nce_case(), _info_nce_inputs(targets="random", m_extra=5)),
    "info_nce_bank": (_info_nce_case(), _info_nce_inputs(bank=True)),
    "info_nce_exclude_self": (_info_nce_case(exclude_self=True),
                              _info_nce_inputs(targets="partner")),
    "info_nce_symmetric": (_info_nce_case(symmetric=True), _info_nce_inputs()),
    "info_nce_unnormalized": (_info_nce_case(normalize=False), _info_nce_inputs()),
    "clip_loss": (_clip, _pair),
    "nt_xent": (_nt_xent, _pair),
}
TWO_ROWS = ("info_nce_exclude_self",)
# 1 / temperature (clip_loss: the logit scale) of each case, and whether it normalises.
SCALES = {"clip_loss": (4.0, False), "nt_xent": (5.0, True), "info_nce_unnormalized": (1 / 0.3,
                                                                                          False)}


def _dims(d):
    """Prefixes of a D-dimensional feature: D = 3 gives (1, 3), larger D four of them."""
    return (1, 3) if d == 3 else (2, d // 4 + 1, d // 2, d)


def _weights(dims):
    return tuple(0.5 + 0.25 * i for i in range(len(dims)))


def _logit_bound(case, inputs):
    """A bound on |s^p_ij| (Cauchy-Schwarz): the scale, times max |x|^2 unnormalised."""
    scale, normalized = SCALES.get(case, (1 / 0.3, True))
    largest = max(float(t.detach().norm(dim=-1).max()) for t in inputs.values()
                  if t.is_floating_point())
    return scale * (1.0 if normalized else largest ** 2)


def _value_and_grads(call, inputs, backend, weight=None, **extra):
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    loss = call(inputs, backend, **extra)
    total = (loss * weight).sum() if weight is not None else loss.sum()
    return loss, dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))


def _as64(inputs):
    return {k: (as_float64(v)[0].cpu() if v.is_floating_point() else v.cpu())
            for k, v in inputs.items()}


def _gradient_floor(case, inputs, dims):
    """The magnitude of the terms that cancel in a normalised prefix's input gradient: the
    gradient of prefix p through q^_i = q_i[:d_p] / |q_i[:d_p]| is (g - q^ <q^, g>) / |q_i[:d_p]|,
    two terms of size |g| / |q_i[:d_p]|, |g| ~ 1 / rows for a mean (for d_p = 1 they cancel
    exactly). Their rounding, not the result's size, bounds the error of a short prefix."""
    if not SCALES.get(case, (None, True))[1]:
        return 1.0
    rows = [t.detach().double() for t in inputs.values() if t.is_floating_point()]
    ratio = max(float((t.norm(dim=-1) / t[..., :dims[0]].norm(dim=-1)).max()) for t in rows)
    return max(1.0, ratio / rows[0].shape[0])


def _assert_matches_reference(call, inputs, backend, options, max_logit, label):
    """Loss and input gradients of ``backend`` against the float64 reference, with plain
    PyTorch's error in the test dtype (the reference run there) as the baseline."""
    dtype = next(v.dtype for v in inputs.values() if v.is_floating_point())
    loss, grads = _value_and_grads(call, inputs, backend, **options)
    ref, ref_grads = _value_and_grads(call, _as64(inputs), "reference", **options)
    lowp = {k: (v.detach().cpu().requires_grad_(True) if v.is_floating_point() else v.cpu())
            for k, v in inputs.items()}
    base, base_grads = _value_and_grads(call, lowp, "reference", **options)
    assert loss.dtype == dtype
    assert_close(loss, ref, dtype, f"{label} loss", max_logit=max_logit, baseline=base)
    floor = _gradient_floor(label.split("/")[1], inputs, options["matryoshka_dims"])
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], dtype, f"{label} d{name}", max_logit=max_logit,
                     baseline=base_grads[name], floor=floor)


def _skip_shape(backend, case, n, dtype):
    """The backend's own skips, plus: exclude_self needs two rows; half precision on the CPU
    backends only on the small shapes (they upcast anyway)."""
    _skip(backend, dtype, n)
    if case in TWO_ROWS and n < 2:
        pytest.skip("exclude_self needs two rows")
    if dtype in (torch.float16, torch.bfloat16) and n > 9 and backend != "triton":
        pytest.skip("half precision checked on the small shapes (the CPU upcasts anyway)")


# D = 3 with dims (1, 3); N = 1 (one candidate, or none but the positive), 257 (blocks + 1).
SHAPES = [(1, 3), (9, 16), (257, 3)]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n,d", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
def test_every_backend_matches_the_float64_reference(backend, case, n, d, dtype):
    _skip_shape(backend, case, n, dtype)
    call, make = CASES[case]
    dims = _dims(d)
    inputs = make(n, d, dtype, device_for(backend))
    _assert_matches_reference(call, inputs, backend,
                              dict(matryoshka_dims=dims, matryoshka_weights=_weights(dims)),
                              _logit_bound(case, _as64(inputs)) * sum(_weights(dims)),
                              f"{backend}/{case}")


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_the_weighted_sum_of_separate_calls(backend, case):
    """On each backend: one Matryoshka call == sum_p w_p (the same loss on x[:, :d_p])."""
    _skip(backend)
    call, make = CASES[case]
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = make(12, 16, dtype, device_for(backend))
    dims, weights = (3, 8, 16), (1.0, 0.5, 2.0)
    loss, grads = _value_and_grads(call, inputs, backend, matryoshka_dims=dims,
                                   matryoshka_weights=weights)
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    total = 0
    for d, w in zip(dims, weights):
        cut = {k: (v[..., :d].contiguous() if v.is_floating_point() else v)
               for k, v in inputs.items()}
        total = total + w * call(cut, backend)
    separate = torch.autograd.grad(total, list(leaves.values()))
    assert_close(loss, total, dtype, f"{case} loss", max_logit=10.0)
    for (name, grad), expected in zip(grads.items(), separate):
        assert_close(grad, expected, dtype, f"{case} d{name}", max_logit=10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_prefix_is_normalised_on_its_own(backend):
    """sentence-transformers' MatryoshkaLoss over MultipleNegativesRankingLoss: F.normalize of
    the truncated embeddings, cross-entropy of the scaled cosine logits, weights default 1."""
    _skip(backend)
    device, dtype = device_for(backend), torch.float32 if backend == "triton" else torch.float64
    q, k = _rand(10, 12, dtype=dtype, device=device), _rand(10, 12, dtype=dtype, device=device)
    loss = fc.info_nce(q, k, temperature=0.05, matryoshka_dims=(4, 12), backend=backend)
    expected = 0
    for d in (12, 4):  # sentence-transformers sorts the dims in descending order
        logits = F.normalize(q.double()[:, :d], dim=-1) @ F.normalize(k.double()[:, :d],
                                                                      dim=-1).T / 0.05
        expected = expected + F.cross_entropy(logits, torch.arange(10, device=device))
    assert_close(loss, expected, dtype, "loss", max_logit=20.0)


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("case", ["info_nce", "clip_loss", "nt_xent", "info_nce_bank"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_reductions_match_the_reference(backend, case, reduction):
    _skip(backend)
    call, make = CASES[case]
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = make(7, 8, dtype, device_for(backend))
    options = dict(matryoshka_dims=(2, 5, 8), reduction=reduction)
    weight = torch.rand(14 if case == "nt_xent" else 7, dtype=dtype,
                        device=device_for(backend)) if reduction == "none" else None
    loss, grads = _value_and_grads(call, inputs, backend, weight, **options)
    ref, ref_grads = _value_and_grads(call, _as64(inputs), "reference",
                                      None if weight is None else weight.double().cpu(),
                                      **options)
    assert_close(loss, ref, dtype, f"{case} loss", max_logit=20.0)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], dtype, f"{case} d{name}", max_logit=20.0)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("case", ["info_nce_symmetric", "nt_xent", "info_nce_bank",
                                  "info_nce_grouped_keys"])
def test_gradcheck_float64(backend, case):
    _skip(backend)
    call, make = CASES[case]
    inputs = make(5, 4, torch.float64, "cpu")
    names = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]
    options = dict(matryoshka_dims=(1, 3, 4), matryoshka_weights=(0.3, 1.0, 2.0))
    assert torch.autograd.gradcheck(
        lambda *tensors: call({**inputs, **dict(zip(names, tensors))}, backend, **options),
        [inputs[k] for k in names])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_temperature_gets_the_reference_gradient(backend):
    _skip(backend)
    device, dtype = device_for(backend), torch.float32 if backend == "triton" else torch.float64
    q, k = _rand(6, 8, dtype=dtype, device=device), _rand(6, 8, dtype=dtype, device=device)
    tau = torch.tensor(0.2, dtype=dtype, device=device, requires_grad=True)
    loss = fc.info_nce(q, k, temperature=tau, matryoshka_dims=(3, 8), backend=backend)
    tau64 = tau.detach().double().cpu().requires_grad_(True)
    ref = fc.info_nce(q.detach().double().cpu(), k.detach().double().cpu(), temperature=tau64,
                      matryoshka_dims=(3, 8), backend="reference")
    assert_close(torch.autograd.grad(loss, tau)[0], torch.autograd.grad(ref, tau64)[0], dtype,
                 "dtemperature", max_logit=10.0)


@pytest.mark.parametrize("dims, weights, error, match", [
    ((4, 2), None, ValueError, r"matryoshka_dims must be strictly increasing, got \(4, 2\)"),
    ((2, 2), None, ValueError, r"strictly increasing, got \(2, 2\)"),
    ((0, 4), None, ValueError, r"matryoshka_dims must be positive, got \(0, 4\)"),
    ((2, 9), None, ValueError, r"must not exceed the feature dimension D = 8, got \(2, 9\)"),
    ((), None, ValueError, r"at least one dimension, got \(\)"),
    ((2.5, 4), None, TypeError, r"matryoshka_dims must hold ints, got 2.5"),
    (4, None, TypeError, r"matryoshka_dims must be a sequence of ints, got int"),
    ((2, 4), (1.0,), ValueError, r"one weight per dimension of matryoshka_dims \(2\), got 1"),
    ((2, 4), (1.0, float("nan")), ValueError, r"matryoshka_weights must be finite numbers"),
    ((2, 4), (1.0, float("inf")), ValueError, r"matryoshka_weights must be finite numbers"),
    (None, (1.0,), ValueError, r"matryoshka_weights needs matryoshka_dims"),
])
def test_bad_matryoshka_arguments_are_refused(dims, weights, error, match):
    q, k = torch.randn(2, 4, 8)
    for call in (lambda: fc.info_nce(q, k, matryoshka_dims=dims, matryoshka_weights=weights),
                 lambda: fc.clip_loss(q, k, 10.0, matryoshka_dims=dims,
                                      matryoshka_weights=weights),
                 lambda: fc.nt_xent(q, k, matryoshka_dims=dims, matryoshka_weights=weights)):
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("options, name", [
    (dict(label_smoothing=0.1), "label_smoothing"),
    (dict(decoupled=True), "decoupled"),
    (dict(hcl_beta=0.5), "hcl_beta"),
    (dict(in_batch_negatives=False), "in_batch_negatives=False"),
    (dict(negatives=torch.randn(4, 3, 8)), "per-query negatives"),
    (dict(query_labels=torch.zeros(4, dtype=torch.long),
          key_labels=torch.zeros(4, dtype=torch.long)), "query_labels"),
    (dict(negatives=torch.randn(3, 8), query_ids=torch.zeros(4, dtype=torch.long),
          negative_ids=torch.ones(3, dtype=torch.long)), "query_ids"),
])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_unsupported_combinations_raise_not_implemented(options, name, backend):
    q, k = torch.randn(2, 4, 8)
    with pytest.raises(NotImplementedError, match=f"matryoshka_dims cannot be combined with "
                                                  f".*{name}"):
        fc.info_nce(q, k, matryoshka_dims=(2, 8), backend=backend, **options)
    with pytest.raises(NotImplementedError, match="labels"):
        fc.clip_loss(q, k, 10.0, matryoshka_dims=(2, 8), labels=torch.zeros(4, dtype=torch.long),
                     backend=backend)
    with pytest.raises(NotImplementedError, match="label_smoothing"):
        fc.nt_xent(q, k, matryoshka_dims=(2, 8), label_smoothing=0.1, backend=backend)


def test_single_full_prefix_is_the_plain_loss():
    q, k = torch.randn(2, 9, 6, dtype=torch.float64)
    for backend in ("torch", "reference"):
        assert_close(fc.info_nce(q, k, matryoshka_dims=(6,), backend=backend),
                     fc.info_nce(q, k, backend=backend), torch.float64, "loss")
        assert_close(fc.clip_loss(q, k, 5.0, matryoshka_dims=(6,), backend=backend),
                     fc.clip_loss(q, k, 5.0, backend=backend), torch.float64, "loss")


def test_module_twins_take_matryoshka_dims():
    q, k = torch.randn(2, 6, 8)
    options = dict(matryoshka_dims=(2, 8), matryoshka_weights=(0.5, 1.0))
    assert torch.equal(fc.InfoNCELoss(0.2, **options)(q, k),
                       fc.info_nce(q, k, temperature=0.2, **options))
    assert torch.equal(fc.NTXentLoss(0.2, **options)(q, k),
                       fc.nt_xent(q, k, temperature=0.2, **options))
    clip = fc.ClipLoss(10.0, learnable=False, **options)
    assert torch.equal(clip(q, k), fc.clip_loss(q, k, clip.logit_scale, **options))
    assert "matryoshka_dims=(2, 8)" in repr(clip)
    assert "matryoshka_dims=(2, 8)" in repr(fc.InfoNCELoss(**options))
    assert "matryoshka" not in repr(fc.InfoNCELoss())


@pytest.mark.parametrize("exclude_diag, with_col", [(False, False), (True, True)])
def test_cpu_kernels_over_several_blocks_match_the_torch_kernels(exclude_diag, with_col):
    """The C++ kernels with forced small blocks (several query blocks, a last partial one)
    against the torch backend's, in float64: lse of every prefix and all four gradients."""
    _skip("cpu")
    from fastcontrast import _ext, _torch_matryoshka
    ext = _ext.load_extension()
    x, y = torch.randn(2, 37, 10, dtype=torch.float64)
    alpha, beta = torch.rand(2, 3, 37, dtype=torch.float64) + 0.5
    bounds = [0, 2, 7, 9]  # the last bound below D: the tail gets no gradient
    row_grad, col_grad = torch.randn(2, 3, 37, dtype=torch.float64)
    got = ext.matryoshka_lse_forward(x, y, alpha, beta, bounds, exclude_diag=exclude_diag,
                                     with_col_lse=with_col, block_rows=8)
    want = _torch_matryoshka.matryoshka_lse_forward(x, y, alpha, beta, bounds,
                                                     exclude_diag=exclude_diag,
                                                     with_col_lse=with_col)
    cols = (got[1], col_grad) if with_col else (None, None)
    grads = ext.matryoshka_lse_backward(x, y, alpha, beta, bounds, got[0], row_grad, *cols,
                                        exclude_diag=exclude_diag, block_rows=8)
    expected = _torch_matryoshka.matryoshka_lse_backward(x, y, alpha, beta, bounds, want[0],
                                                         row_grad, *cols,
                                                         exclude_diag=exclude_diag)
    for name, a, b in zip(("row_lse", "col_lse", "dx", "dy", "dalpha", "dbeta"),
                          (*got, *grads), (*want, *expected)):
        if b is None:
            assert a is None, name
            continue
        assert_close(a, b, torch.float64, name)
    assert grads[0][:, 9:].abs().max() == 0


def test_fused_forward_gradient_scales_or_recomputes():
    """cpu forms the gradient in the forward pass for the row gradient it is given: an upstream
    gradient that is a multiple of it scales them, any other one is recomputed; both equal the
    recomputing op's gradients."""
    _skip("cpu")
    from fastcontrast.infonce.matryoshka_ops import matryoshka_lse, matryoshka_lse_fused
    x, y = torch.randn(2, 11, 6, dtype=torch.float64)
    alpha, beta = torch.rand(2, 2, 11, dtype=torch.float64) + 0.5
    pattern = torch.rand(2, 11, dtype=torch.float64)
    for upstream in (3 * pattern, torch.randn(2, 11, dtype=torch.float64)):
        leaves = [t.clone().requires_grad_(True) for t in (x, y, alpha, beta)]
        fused = matryoshka_lse_fused(*leaves, (0, 2, 6), pattern, exclude_diag=True,
                                     backend="cpu")
        got = torch.autograd.grad((fused * upstream).sum(), leaves)
        plain, _ = matryoshka_lse(*leaves, (0, 2, 6), exclude_diag=True, with_col_lse=False,
                                  backend="cpu")
        assert_close(fused, plain, torch.float64, "row_lse")
        want = torch.autograd.grad((plain * upstream).sum(), leaves)
        for name, a, b in zip(("dx", "dy", "dalpha", "dbeta"), got, want):
            assert_close(a, b, torch.float64, name)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiles(backend):
    _skip(backend)
    torch._dynamo.reset()

    def step(q, k):
        return fc.info_nce(q, k, temperature=0.2, matryoshka_dims=(2, 5), backend=backend)

    compiled = torch.compile(step, fullgraph=True)
    q, k = torch.randn(2, 7, 5)
    leaves = [q.clone().requires_grad_(True), k.clone().requires_grad_(True)]
    got = compiled(*leaves)
    grads = torch.autograd.grad(got, leaves)
    want = step(*leaves)
    assert_close(got, want, torch.float32, "loss")
    for a, b in zip(grads, torch.autograd.grad(want, leaves)):
        assert_close(a, b, torch.float32, "grad")


def test_distributed_losses_take_matryoshka():
    """The distributed twins take the prefixes (checked across ranks in tests/distributed):
    without a process group a valid call gets as far as asking for one, a bad one is refused
    before any communication as single-process."""
    from fastcontrast import distributed as fcd

    q, k = torch.randn(4, 8), torch.randn(4, 8)
    for call in (lambda: fcd.info_nce(q, k, matryoshka_dims=(4, 8)),
                 lambda: fcd.clip_loss(q, k, 10.0, matryoshka_dims=(4, 8)),
                 lambda: fcd.nt_xent(q, k, matryoshka_dims=(4,), matryoshka_weights=(1.0,))):
        with pytest.raises(RuntimeError, match="init_process_group"):
            call()
    with pytest.raises(ValueError, match="matryoshka_weights needs matryoshka_dims"):
        fcd.nt_xent(q, k, matryoshka_weights=(1.0,))
