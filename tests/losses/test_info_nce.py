"""info_nce: every fused backend against the float64 reference, values and gradients (query,
key, negatives, temperature) over options x odd shapes x dtypes x temperatures; HCL with
query / negative ids; gradcheck over every option set; the symmetric-Gram path of a set
against itself; the InfoNCELoss module; and bad input, which info_nce's argument checks (shared
by the other losses) name clearly. The properties every loss shares: tests/losses/contract/."""
import math

import pytest
import torch

import fastcontrast
from fastcontrast import backends
from fastcontrast.reference import info_nce_reference

from .._helpers import (FUSED_BACKENDS, as_float64, assert_close, backend_usable, device_for,
                       interpreting_triton, make_inputs)
from ._cases import (DTYPES, GRAM_BACKENDS, D, N, assert_gram_same, check_against_reference,
                     gram_and_baseline, leaf, q_k, raises_clear_error, skip_unavailable,
                     skip_unsupported)

# Option sets of docs/design.md section 2. "m" is a function of n; "targets" a recipe.
OPTIONS = {
    "plain": dict(),
    "grouped_keys": dict(m=lambda n: 2 * n + 3, targets="random"),
    "shared_bank": dict(negatives="bank"),
    "per_query_negatives": dict(negatives="per_query"),
    "moco_queue": dict(negatives="bank", in_batch_negatives=False),
    "positive_and_per_query_only": dict(negatives="per_query", in_batch_negatives=False),
    "exclude_self": dict(targets="partner", exclude_self=True),
    "exclude_self_bank": dict(targets="partner", exclude_self=True, negatives="bank"),
    "symmetric": dict(symmetric=True),
    "unnormalized": dict(normalize=False),
}
SHAPES = [(1, 3), (7, 64), (257, 1000)]


def _targets(recipe, n, m, device):
    if recipe == "random":
        return torch.randint(0, m, (n,), device=device)
    if recipe == "partner":  # another row of the same set (needs n >= 2)
        return (torch.arange(n, device=device) + torch.randint(1, n, (n,), device=device)) % n
    return None


def _build(case, n, d, dtype, device, scale=1.0):
    spec = dict(OPTIONS[case])
    m = spec.pop("m", lambda n_: n_)(n)
    q, k, neg = make_inputs(n, m, d, dtype, device, negatives=spec.pop("negatives", None),
                            scale=scale)
    targets = _targets(spec.pop("targets", None), n, m, device)
    return q, k, neg, targets, spec


def _skip_unsupported(backend, case, n, d, dtype):
    if not backend_usable(backend, device_for(backend)):
        pytest.skip(f"backend {backend!r} unavailable here")
    if OPTIONS[case].get("targets") == "partner" and n < 2:
        pytest.skip("exclude_self needs two rows")
    if backend == "triton":
        if dtype not in backends.PROPERTIES["triton"].compute_dtypes:
            pytest.skip(f"triton kernels do not take {dtype}")
        if interpreting_triton(backend) and n * d > 64 * 1000 and case not in ("plain",
                                                                                 "symmetric"):
            pytest.skip("large shapes run only for two cases in the slow Triton interpreter")
        if interpreting_triton(backend) and dtype == torch.float16 and n * d > 64 * 1000:
            pytest.skip("float16 at large D in the interpreter: the kernels' own test "
                        "(tests/kernels/test_masked_lse_contract.py) covers it")
        if interpreting_triton(backend) and dtype == torch.bfloat16 and n > 7:
            pytest.skip("bf16 in the interpreter is emulated slowly; small shape only")


def _loss_and_grads(fn, q, k, neg, tau, reduction, weight):
    loss = fn(q, k, neg, tau)
    inputs = [t for t in (q, k, neg, tau) if t is not None and t.requires_grad]
    total = (loss * weight).sum() if reduction == "none" else loss * 1.5
    return loss, torch.autograd.grad(total, inputs)


def _on_cpu(opts):
    return {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in opts.items()}


def _max_abs_logit(q, k, neg, tau, normalize):
    """max |s_ij| over every pair, from the float64 inputs (sets the rounding tolerance)."""
    keys = [k] if neg is None else [k, neg.reshape(-1, neg.shape[-1])]
    norm = (lambda t: torch.nn.functional.normalize(t, dim=-1)) if normalize else (lambda t: t)
    with torch.no_grad():
        return max(float((norm(q.cpu()) @ norm(y.cpu()).T).abs().max()) for y in keys) / tau


def _check_against_reference(backend, case, q, k, neg, targets, spec, tau_value, reduction,
                             dtype, *, learn_tau=True):
    device = q.device
    tau = torch.tensor(tau_value, dtype=torch.float64, device=device, requires_grad=learn_tau)
    opts = dict(targets=targets, reduction=reduction, **spec)
    loss, grads = _loss_and_grads(
        lambda a, b, c, t: fastcontrast.info_nce(a, b, c, temperature=t, backend=backend, **opts),
        q, k, neg, tau, reduction,
        weight=torch.linspace(-1, 2, q.shape[0], dtype=dtype, device=device))
    q64, k64, neg64, tau64 = as_float64(q, k, neg, tau)
    ref, ref_grads = _loss_and_grads(
        lambda a, b, c, t: info_nce_reference(a, b, c, temperature=t, **opts),
        q64, k64, neg64, tau64, reduction,
        weight=torch.linspace(-1, 2, q.shape[0], dtype=torch.float64))
    # The same reference computed in the test dtype (on the CPU): the error baseline.
    q_lp, k_lp, neg_lp, tau_lp = [None if t is None else t.detach().cpu().requires_grad_(
        t.requires_grad) for t in (q, k, neg, tau)]
    base, base_grads = _loss_and_grads(
        lambda a, b, c, t: info_nce_reference(a, b, c, temperature=t, **_on_cpu(opts)),
        q_lp, k_lp, neg_lp, tau_lp, reduction,
        weight=torch.linspace(-1, 2, q.shape[0], dtype=dtype))
    assert loss.dtype == dtype and loss.shape == ref.shape
    max_logit = _max_abs_logit(q64, k64, neg64, tau_value, spec.get("normalize", True))
    assert_close(loss, ref.cpu(), dtype, f"{backend}/{case} loss", max_logit=max_logit,
                 baseline=base)
    names = [n for n, t in zip(("query", "key", "negatives", "temperature"), (q, k, neg, tau))
             if t is not None and t.requires_grad]
    for name, grad, ref_grad, base_grad in zip(names, grads, ref_grads, base_grads):
        expected_dtype = torch.float64 if name == "temperature" else dtype
        assert grad.dtype == expected_dtype, f"{name} grad dtype {grad.dtype}"
        # d tau = -(1/tau) sum_ij dS_ij s_ij cancels: its rounding scales with max|s| / tau.
        scale = None
        if name == "temperature":
            rows = 1 if reduction == "mean" else 2 * q.shape[0]
            scale = max(1.0, float(ref_grad.abs()), rows * max_logit / tau_value)
        elif not ref_grad.any():
            # Exactly 0 (a row whose only candidate is its positive) is (p - 1) x / tau in the
            # kernels, with p rounded at max|s|: the rounding scales with |x| / tau, not with 0.
            norms = [float(t.detach().norm(dim=-1).max()) for t in (q64, k64) if t.numel()]
            scale = max(1.0, max(norms) / tau_value)
        assert_close(grad, ref_grad.cpu(), dtype, f"{backend}/{case} d{name}",
                     max_logit=max_logit, baseline=base_grad, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n,d", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("case", list(OPTIONS))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_matches_reference(backend, case, n, d, dtype):
    _skip_unsupported(backend, case, n, d, dtype)
    if dtype in (torch.float16, torch.bfloat16) and n * d > 7 * 64 and backend != "triton":
        pytest.skip("half precision checked on the small shapes (the CPU upcasts anyway)")
    device = device_for(backend)
    q, k, neg, targets, spec = _build(case, n, d, dtype, device)
    _check_against_reference(backend, case, q, k, neg, targets, spec, 0.07, "mean", dtype)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("case", ["plain", "grouped_keys", "moco_queue", "exclude_self_bank",
                                  "per_query_negatives", "symmetric"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_reductions(backend, case, reduction):
    _skip_unsupported(backend, case, 33, 16, torch.float32)
    q, k, neg, targets, spec = _build(case, 33, 16, torch.float32, device_for(backend))
    _check_against_reference(backend, case, q, k, neg, targets, spec, 0.1, reduction,
                             torch.float32)


@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0])
@pytest.mark.parametrize("case", ["plain", "moco_queue", "symmetric", "exclude_self"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_temperatures(backend, case, tau):
    _skip_unsupported(backend, case, 40, 24, torch.float32)
    q, k, neg, targets, spec = _build(case, 40, 24, torch.float32, device_for(backend))
    _check_against_reference(backend, case, q, k, neg, targets, spec, tau, "mean", torch.float32)


@pytest.mark.parametrize("case", ["unnormalized", "symmetric", "grouped_keys", "moco_queue"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_large_norm_tiny_temperature(backend, case):
    """|s| up to ~1e4: no overflow, no NaN; compared in fp32 relative to the logit scale."""
    _skip_unsupported(backend, case, 31, 16, torch.float32)
    q, k, neg, targets, spec = _build(case, 31, 16, torch.float32, device_for(backend),
                                      scale=25.0)
    spec["normalize"] = False
    _check_against_reference(backend, case, q, k, neg, targets, spec, 0.01, "mean",
                             torch.float32)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_float_temperature_and_frozen_inputs(backend):
    """A plain float temperature, and only some inputs requiring grad (e.g. a MoCo key)."""
    _skip_unsupported(backend, "moco_queue", 20, 8, torch.float32)
    device = device_for(backend)
    q, k, neg = make_inputs(20, 20, 8, torch.float32, device, negatives="bank")
    k.requires_grad_(False)
    neg.requires_grad_(False)
    loss = fastcontrast.info_nce(q, k, neg, temperature=0.2, backend=backend)
    (grad,) = torch.autograd.grad(loss, [q])
    q64, k64, neg64 = as_float64(q, k, neg)
    ref = info_nce_reference(q64, k64, neg64, temperature=0.2)
    (ref_grad,) = torch.autograd.grad(ref, [q64])
    assert_close(loss, ref, torch.float32, "loss")
    assert_close(grad, ref_grad, torch.float32, "dquery")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_no_grad_and_retain_graph(backend):
    _skip_unsupported(backend, "plain", 9, 8, torch.float64)
    device = device_for(backend)
    q, k, _ = make_inputs(9, 9, 8, torch.float64, device)
    with torch.no_grad():
        value = fastcontrast.info_nce(q, k, backend=backend)
    loss = fastcontrast.info_nce(q, k, backend=backend)
    assert torch.allclose(value, loss.detach())
    first = torch.autograd.grad(loss, [q, k], retain_graph=True)
    second = torch.autograd.grad(2 * loss, [q, k])
    for a, b in zip(first, second):
        assert torch.allclose(2 * a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_fn", ["info_nce", "siglip_loss"])
def test_fused_gradients_reach_grad_without_a_copy(loss_fn):
    """A backend that forms the gradients in the forward pass saves them for the backward; a
    backward that is their last use scales them in place and .grad takes them as they are (no
    (N, D) copy); with retain_graph=True they stay intact for the next backward."""
    if not backends.PROPERTIES["cpu"].fuses_gradient or "cpu" not in FUSED_BACKENDS:
        pytest.skip("no gradient-fusing CPU backend")
    q, k = (torch.randn(12, 8, requires_grad=True) for _ in range(2))
    scalars = (10.0, -10.0) if loss_fn == "siglip_loss" else ()
    saved = set()

    def pack(t):
        saved.add(t.data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = getattr(fastcontrast, loss_fn)(q, k, *scalars, backend="cpu")
    (3 * loss).backward(retain_graph=True)
    assert q.grad.data_ptr() not in saved and k.grad.data_ptr() not in saved
    first = q.grad.clone()
    q.grad = k.grad = None
    (3 * loss).backward()
    assert q.grad.data_ptr() in saved and k.grad.data_ptr() in saved
    assert torch.equal(q.grad, first)


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
    skip_unsupported(backend, dtype, max(n, 64) * d)
    device = device_for(backend)
    query, key, bank = (leaf(m, d, dtype=dtype, device=device) for m in (n, n, k))
    # Rows 0 and 1 share id 0 (bank entries 0 and 2), row 2 owns entry 1, id -1 masks nothing.
    query_ids = torch.tensor([0, 0, 1, -1, 2, 5], device=device)
    bank_ids = torch.tensor([0, 1, 0, -1, 2], device=device)
    tau = torch.tensor(0.3, dtype=torch.float64, device=device, requires_grad=True)
    opts = dict(hcl_beta=beta, hcl_tau_plus=tau_plus, decoupled=decoupled,
                in_batch_negatives=in_batch, query_ids=query_ids, negative_ids=bank_ids,
                reduction=reduction)
    check_against_reference(
        backend,
        dtype,
        lambda q, kk, b, t, backend: fastcontrast.info_nce(
            q, kk, b, temperature=t, backend=backend, **opts),
        lambda q, kk, b, t: info_nce_reference(q, kk, b, temperature=t, **opts),
        [query, key, bank, tau],
        max_logit=1 / 0.3,
        reduction=reduction,
    )


# ---------------------------------------------------------------------------------------------
# gradcheck (float64, finite differences) over every option set, temperature included


GRADCHECK_OPTIONS = {
    "plain": dict(),
    "grouped_keys": dict(m=9, targets=True),
    "shared_bank": dict(negatives=(3,)),
    "per_query_negatives": dict(negatives=(5, 2)),
    "moco_queue": dict(negatives=(4,), in_batch_negatives=False),
    "exclude_self": dict(exclude_self=True, targets=True),
    "symmetric": dict(symmetric=True),
    "unnormalized": dict(normalize=False),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", list(GRADCHECK_OPTIONS))
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck(backend, name, reduction):
    if not backend_usable(backend):
        pytest.skip(f"backend {backend!r} unavailable here")
    spec = dict(GRADCHECK_OPTIONS[name])
    n, d = 5, 3
    m = spec.pop("m", n)
    dt = torch.float64
    q = torch.randn(n, d, dtype=dt, requires_grad=True)
    k = torch.randn(m, d, dtype=dt, requires_grad=True)
    neg_shape = spec.pop("negatives", None)
    neg = None if neg_shape is None else torch.randn(*neg_shape, d, dtype=dt, requires_grad=True)
    targets = None
    if spec.pop("targets", False):
        targets = torch.randint(0, m, (n,))
        if spec.get("exclude_self"):
            targets = (torch.arange(n) + torch.randint(1, n, (n,))) % n
    tau = torch.tensor(0.5, dtype=dt, requires_grad=True)
    inputs = [t for t in (q, k, neg, tau) if t is not None]

    def loss(*args):
        q_, k_ = args[0], args[1]
        neg_ = args[2] if neg is not None else None
        return fastcontrast.info_nce(q_, k_, neg_, temperature=args[-1], targets=targets,
                                     reduction=reduction, backend=backend, **spec)

    # No nondet_tol: every backward (retained or not) gives bitwise the same gradient.
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The symmetric-Gram path (FASTCONTRAST_GRAM) against the full-product path


@pytest.mark.parametrize("backend", GRAM_BACKENDS)
@pytest.mark.usefixtures("small_gram_blocks")
def test_info_nce_exclude_self_same_tensor_gram_equals_baseline(backend, configure):
    skip_unavailable(backend)
    torch.manual_seed(3)
    z = torch.randn(11, 4, dtype=torch.float64)
    targets = (torch.arange(11) + torch.randint(1, 11, (11,))) % 11  # not an involution
    tau = torch.tensor(0.4, dtype=torch.float64)

    def fn(x, t):
        return fastcontrast.info_nce(x, x, temperature=t, targets=targets, exclude_self=True,
                                     backend=backend)

    gram, base = gram_and_baseline(configure, fn, [z, tau])
    assert_gram_same(gram, base, 1e-11, 1e-11)


# ---------------------------------------------------------------------------------------------
# The InfoNCELoss module


def test_info_nce_loss_module_matches_functional():
    q, k = torch.randn(10, 8), torch.randn(10, 8)
    module = fastcontrast.InfoNCELoss(temperature=0.2, symmetric=True, backend="torch")
    expected = info_nce_reference(q.double(), k.double(), temperature=0.2, symmetric=True)
    assert torch.allclose(module(q, k).double(), expected, rtol=1e-5)
    assert "temperature=0.2" in repr(module)


def test_info_nce_loss_learnable_temperature_gets_gradient():
    module = fastcontrast.InfoNCELoss(temperature=0.1, learn_temperature=True, backend="torch")
    q, k = torch.randn(12, 5), torch.randn(12, 5)
    module(q, k).backward()
    assert math.isclose(float(module.temperature.detach()), 0.1, rel_tol=1e-6)
    grad = module.log_inverse_temperature.grad
    # Reference gradient w.r.t. log(1/tau) through float64 autograd.
    log_inv = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    info_nce_reference(q.double(), k.double(), temperature=torch.exp(-log_inv)).backward()
    assert torch.allclose(grad.double(), log_inv.grad, rtol=1e-4)
    assert set(dict(module.named_parameters())) == {"log_inverse_temperature"}


# ---------------------------------------------------------------------------------------------
# Bad input: a clear TypeError / ValueError naming the argument, expected and actual


def partner_targets(n=N):
    return (torch.arange(n) + 1) % n


BAD_CALLS = {
    "query_not_tensor": (lambda: fastcontrast.info_nce([[1.0]], q_k()[1]), TypeError,
                         r"query must be a torch.Tensor, got list"),
    "key_not_tensor": (lambda: fastcontrast.info_nce(q_k()[0], 3.0), TypeError,
                       r"key must be a torch.Tensor, got float"),
    "query_wrong_ndim": (lambda: fastcontrast.info_nce(torch.randn(N), q_k()[1]), ValueError,
                         r"query must be 2-D, got 1-D \(shape \(6,\)"),
    "key_3d": (lambda: fastcontrast.info_nce(q_k()[0], torch.randn(N, 2, D)), ValueError,
               r"key must be 2-D, got 3-D"),
    "integer_query": (lambda: fastcontrast.info_nce(torch.ones(N, D, dtype=torch.int64),
                                                    q_k()[1]), TypeError,
                      r"query must have a floating-point dtype, got torch.int64"),
    "feature_mismatch": (lambda: fastcontrast.info_nce(q_k()[0], torch.randn(N, D + 1)),
                         ValueError, r"key must have feature dimension D = 4 \(from query\), "
                                     r"got shape \(6, 5\)"),
    "batch_mismatch": (lambda: fastcontrast.info_nce(*q_k(m=N + 2)), ValueError,
                       r"key must have N = 6 rows .* got M = 8; pass targets"),
    "empty_batch": (lambda: fastcontrast.info_nce(*q_k(n=0, m=0)), ValueError,
                    r"query must not be empty, got shape \(0, 4\)"),
    "zero_dim": (lambda: fastcontrast.info_nce(*q_k(d=0)), ValueError,
                 r"query must not be empty, got shape \(6, 0\)"),
    "mixed_dtypes": (lambda: fastcontrast.info_nce(q_k()[0], q_k(dtype=torch.float64)[1]),
                     TypeError, r"key must have the dtype of query \(torch.float32\), "
                                r"got torch.float64"),
    "mixed_devices": (lambda: fastcontrast.info_nce(q_k()[0], q_k()[1].to("meta")), ValueError,
                      r"key must be on the device of query \(cpu\), got meta"),
    "negatives_wrong_dim": (lambda: fastcontrast.info_nce(*q_k(), torch.randn(3, D + 2)),
                            ValueError, r"negatives must have feature dimension D = 4"),
    "per_query_wrong_n": (lambda: fastcontrast.info_nce(*q_k(), torch.randn(N + 1, 3, D)),
                          ValueError, r"per-query negatives must have shape \(N=6, K, D=4\), "
                                      r"got \(7, 3, 4\)"),
    "negatives_4d": (lambda: fastcontrast.info_nce(*q_k(), torch.randn(N, 3, D, 1)),
                     ValueError, r"negatives must be 2-D or 3-D, got 4-D"),
    "targets_out_of_range": (lambda: fastcontrast.info_nce(
        *q_k(), targets=torch.tensor([0, 1, 2, 3, 4, 6])), ValueError,
        r"targets must index keys in \[0, 5\] \(M = 6\), got values in \[0, 6\]"),
    "targets_negative": (lambda: fastcontrast.info_nce(
        *q_k(), targets=torch.tensor([0, 1, 2, 3, 4, -1])), ValueError,
        r"got values in \[-1, 4\]"),
    "targets_int32": (lambda: fastcontrast.info_nce(*q_k(), targets=torch.arange(N).int()),
                      TypeError, r"targets must have dtype torch.int64, got torch.int32"),
    "targets_wrong_shape": (lambda: fastcontrast.info_nce(*q_k(), targets=torch.arange(N - 1)),
                            ValueError, r"targets must have shape \(6,\) .* got \(5,\)"),
    "targets_list": (lambda: fastcontrast.info_nce(*q_k(), targets=[0] * N), TypeError,
                     r"targets must be a torch.Tensor of int64, got list"),
    "temperature_zero": (lambda: fastcontrast.info_nce(*q_k(), temperature=0.0), ValueError,
                         r"temperature must be positive and finite, got 0.0"),
    "temperature_negative": (lambda: fastcontrast.info_nce(*q_k(), temperature=-0.1),
                             ValueError, r"temperature must be positive and finite, got -0.1"),
    "temperature_nan": (lambda: fastcontrast.info_nce(*q_k(), temperature=math.nan), ValueError,
                        r"temperature must be positive and finite, got nan"),
    "temperature_inf_tensor": (lambda: fastcontrast.info_nce(
        *q_k(), temperature=torch.tensor(math.inf)), ValueError,
        r"temperature must be positive and finite, got inf"),
    "temperature_vector": (lambda: fastcontrast.info_nce(*q_k(), temperature=torch.ones(2)),
                           ValueError, r"temperature must be a float or a 0-dim tensor, "
                                       r"got shape \(2,\)"),
    "temperature_string": (lambda: fastcontrast.info_nce(*q_k(), temperature="0.1"), TypeError,
                           r"temperature must be a float or a 0-dim tensor, got str"),
    "temperature_bool": (lambda: fastcontrast.info_nce(*q_k(), temperature=True), TypeError,
                         r"temperature must be a float or a 0-dim tensor, got bool"),
    "unknown_reduction": (lambda: fastcontrast.info_nce(*q_k(), reduction="avg"), ValueError,
                          r"reduction must be one of 'mean', 'sum', 'none', got 'avg'"),
    "unknown_backend": (lambda: fastcontrast.info_nce(*q_k(), backend="cuda-magic"), ValueError,
                        r"backend must be one of 'auto', 'reference', 'torch', 'cpu', 'triton', "
                        r"got 'cuda-magic'"),
    "symmetric_with_targets": (lambda: fastcontrast.info_nce(
        *q_k(), targets=torch.arange(N), symmetric=True), ValueError,
        r"symmetric=True needs N == M and targets=None"),
    "symmetric_n_ne_m": (lambda: fastcontrast.info_nce(
        *q_k(m=N + 1), targets=torch.arange(N), symmetric=True), ValueError,
        r"symmetric=True needs N == M and targets=None, got N = 6, M = 7"),
    "symmetric_with_negatives": (lambda: fastcontrast.info_nce(
        *q_k(), torch.randn(3, D), symmetric=True), ValueError,
        r"symmetric=True supports neither negatives"),
    "exclude_self_without_targets": (lambda: fastcontrast.info_nce(*q_k(), exclude_self=True),
                                     ValueError, r"exclude_self=True needs targets"),
    "exclude_self_positive_is_self": (lambda: fastcontrast.info_nce(
        *q_k(), exclude_self=True, targets=torch.arange(N)), ValueError,
        r"targets\[i\] must differ from i"),
    "exclude_self_m_ne_n": (lambda: fastcontrast.info_nce(
        *q_k(m=N + 2), exclude_self=True, targets=partner_targets()), ValueError,
        r"exclude_self=True needs query and key to be the same set \(M == N\), got N = 6, M = 8"),
    "flag_not_bool": (lambda: fastcontrast.info_nce(*q_k(), normalize="yes"), TypeError,
                      r"normalize must be a bool, got str"),
    "cpu_backend_on_meta": (lambda: fastcontrast.info_nce(
        *(t.to("meta") for t in q_k()), backend="cpu"), ValueError,
        r"backend='cpu' needs CPU tensors, got tensors on meta"),
    "symmetric_dcl": (
        lambda: fastcontrast.info_nce(
            torch.randn(4, 3), torch.randn(4, 3), symmetric=True, decoupled=True
        ),
        ValueError,
        "symmetric",
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
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_clear_error(name):
    raises_clear_error(BAD_CALLS[name])


def test_triton_backend_on_cpu_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match=r"backend='triton' needs CUDA tensors"):
        fastcontrast.info_nce(*q_k(), backend="triton")


def test_triton_backend_refuses_float64():
    if "triton" not in fastcontrast.available_backends("cuda" if torch.cuda.is_available()
                                                        else "cpu"):
        pytest.skip("triton unavailable")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = (t.to(device) for t in q_k(dtype=torch.float64))
    with pytest.raises(TypeError, match=r"backend='triton' computes in float16/bfloat16/float32, "
                                        r"got float64"):
        fastcontrast.info_nce(q, k, backend="triton")


def test_module_rejects_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be a positive finite float"):
        fastcontrast.InfoNCELoss(temperature=0.0)

