"""Every fused backend against the float64 reference: values and gradients (query, key,
negatives, temperature) over options x odd shapes x dtypes x temperatures."""
import pytest
import torch

import fastcontrast
from fastcontrast import backends
from fastcontrast.reference import info_nce_reference

from .._helpers import (FUSED_BACKENDS, as_float64, assert_close, backend_usable, device_for,
                       interpreting_triton, make_inputs)

# Option sets of docs/design.md section 2. "m" is a function of n; "targets" a recipe.
CASES = {
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
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _targets(recipe, n, m, device):
    if recipe == "random":
        return torch.randint(0, m, (n,), device=device)
    if recipe == "partner":  # another row of the same set (needs n >= 2)
        return (torch.arange(n, device=device) + torch.randint(1, n, (n,), device=device)) % n
    return None


def _build(case, n, d, dtype, device, scale=1.0):
    spec = dict(CASES[case])
    m = spec.pop("m", lambda n_: n_)(n)
    q, k, neg = make_inputs(n, m, d, dtype, device, negatives=spec.pop("negatives", None),
                            scale=scale)
    targets = _targets(spec.pop("targets", None), n, m, device)
    return q, k, neg, targets, spec


def _skip_unsupported(backend, case, n, d, dtype):
    if not backend_usable(backend, device_for(backend)):
        pytest.skip(f"backend {backend!r} unavailable here")
    if CASES[case].get("targets") == "partner" and n < 2:
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
        assert_close(grad, ref_grad.cpu(), dtype, f"{backend}/{case} d{name}",
                     max_logit=max_logit, baseline=base_grad, scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n,d", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("case", list(CASES))
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


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n,d", [(1, 3), (23, 12), (257, 64)], ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_clip_loss_matches_reference(backend, n, d, dtype):
    from fastcontrast.reference import clip_loss_reference

    _skip_unsupported(backend, "symmetric", n, d, dtype)
    device = device_for(backend)
    image, text, _ = make_inputs(n, n, d, dtype, device, scale=d ** -0.5)
    scale = torch.tensor(14.0, device=device, requires_grad=True)
    bias = torch.tensor(-3.0, device=device, requires_grad=True)
    loss = fastcontrast.clip_loss(image, text, scale, logit_bias=bias, backend=backend)
    grads = torch.autograd.grad(loss, [image, text, scale, bias])
    inputs64 = as_float64(image, text, scale, bias)
    ref = clip_loss_reference(*inputs64[:3], logit_bias=inputs64[3])
    ref_grads = torch.autograd.grad(ref, inputs64)
    # The same reference in the test dtype (on the CPU) is the error baseline.
    inputs_lp = [t.detach().cpu().requires_grad_() for t in (image, text, scale, bias)]
    base = clip_loss_reference(*inputs_lp[:3], logit_bias=inputs_lp[3])
    base_grads = torch.autograd.grad(base, inputs_lp)
    with torch.no_grad():
        max_logit = 14.0 * float((inputs64[0] @ inputs64[1].T).abs().max())
    assert loss.dtype == dtype
    assert_close(loss, ref, dtype, "clip loss", max_logit=max_logit, baseline=base)
    for name, g, r, b in zip(("image", "text", "logit_scale", "logit_bias"), grads, ref_grads,
                             base_grads):
        assert_close(g, r, dtype, f"clip d{name}", max_logit=max_logit, baseline=b)


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
