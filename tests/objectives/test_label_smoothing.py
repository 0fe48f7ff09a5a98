"""label_smoothing of info_nce, clip_loss, nt_xent and moco_loss (fastcontrast/infonce/
label_smoothing.py): every backend against the float64 reference, values and gradients; equal to
F.cross_entropy(label_smoothing=eps) on the materialised logits where no entry is masked; masked
entries are not classes; argument errors; the module twins."""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc
from fastcontrast import backends
from fastcontrast.reference import nt_xent_reference

from .._helpers import (FUSED_BACKENDS, as_float64, assert_close,
                        assert_compiles_with_changing_batch_sizes, backend_usable, device_for,
                        interpreting_triton)

BACKENDS = ("reference", *FUSED_BACKENDS)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _skip(backend, dtype=torch.float32, n=1):
    if not backend_usable(backend, device_for(backend)):
        pytest.skip(f"backend {backend!r} unavailable here")
    if backend == "triton" and dtype not in backends.PROPERTIES["triton"].compute_dtypes:
        pytest.skip(f"triton kernels do not take {dtype}")
    if interpreting_triton(backend) and n > 64:
        pytest.skip("the Triton interpreter runs the small shapes")


def _skip_unchecked(backend, dtype, n, reduction=None):
    """_skip, and the cases of the reference comparisons left to smaller shapes: half precision
    beyond N = 10 but on triton (the CPU backends upcast it), "sum" beyond N = 10 or off
    float32 (``reduction`` given)."""
    _skip(backend, dtype, n)
    if dtype in (torch.float16, torch.bfloat16) and n > 10 and backend != "triton":
        pytest.skip("half precision checked on the small shapes (the CPU upcasts anyway)")
    if reduction == "sum" and (n > 10 or dtype != torch.float32):
        pytest.skip("'sum' checked on the small float32 shapes")


def _usable_device_and_dtype(backend):
    """(device, dtype) of a closed-form check: float64 where the backend takes it."""
    _skip(backend)
    return device_for(backend), torch.float32 if backend == "triton" else torch.float64


def _rand(*shape, dtype, device, scale=1.0):
    t = torch.randn(*shape, dtype=torch.float64) * scale
    return t.to(dtype=dtype, device=device).requires_grad_(True)


def _partner(n, device):
    """targets t_i != i over one set of n >= 2 rows."""
    return (torch.arange(n, device=device) + torch.randint(1, n, (n,), device=device)) % n


# name -> (loss of (inputs, backend, eps) -> tensor, inputs of (n, d, dtype, device))
def _info_nce_case(**options):
    def call(t, backend, eps):
        extra = {k: v for k, v in t.items() if k not in ("query", "key", "negatives")}
        return fc.info_nce(t["query"], t["key"], t.get("negatives"), temperature=0.3,
                           label_smoothing=eps, backend=backend, **extra, **options)
    return call


def _info_nce_inputs(negatives=None, targets=None, ids=False, m_extra=0):
    def make(n, d, dtype, device):
        t = dict(query=_rand(n, d, dtype=dtype, device=device),
                 key=_rand(n + m_extra, d, dtype=dtype, device=device))
        if negatives == "bank":
            t["negatives"] = _rand(6, d, dtype=dtype, device=device)
        elif negatives == "per_query":
            t["negatives"] = _rand(n, 4, d, dtype=dtype, device=device)
        if targets == "random":
            t["targets"] = torch.randint(0, n + m_extra, (n,), device=device)
        elif targets == "partner":
            t["targets"] = _partner(n, device)
        if ids:  # some bank entries share a query's id, some ids are -1 (no mask)
            t["query_ids"] = torch.randint(-1, 4, (n,), device=device)
            t["negative_ids"] = torch.randint(-1, 4, (6,), device=device)
        return t
    return make


def _pair(n, d, dtype, device):
    return dict(a=_rand(n, d, dtype=dtype, device=device),
                b=_rand(n, d, dtype=dtype, device=device))


CASES = {
    "info_nce": (_info_nce_case(), _info_nce_inputs()),
    "info_nce_grouped_keys": (_info_nce_case(), _info_nce_inputs(targets="random", m_extra=5)),
    "info_nce_bank_with_ids": (_info_nce_case(), _info_nce_inputs("bank", ids=True)),
    "info_nce_per_query": (_info_nce_case(), _info_nce_inputs("per_query")),
    "info_nce_exclude_self": (_info_nce_case(exclude_self=True),
                              _info_nce_inputs(targets="partner")),
    "info_nce_symmetric": (_info_nce_case(symmetric=True), _info_nce_inputs()),
    "info_nce_unnormalized": (_info_nce_case(normalize=False), _info_nce_inputs()),
    "clip_loss": (lambda t, backend, eps: fc.clip_loss(t["a"], t["b"], 20.0, label_smoothing=eps,
                                                       backend=backend), _pair),
    "nt_xent": (lambda t, backend, eps: fc.nt_xent(t["a"], t["b"], temperature=0.2,
                                                   label_smoothing=eps, backend=backend), _pair),
    "moco_loss": (lambda t, backend, eps: fc.moco_loss(
        t["query"], t["key"], t["negatives"], label_smoothing=eps, backend=backend),
        _info_nce_inputs("bank")),
}
TWO_ROWS = ("info_nce_exclude_self",)


# 1 / temperature (clip_loss: the logit scale) of each case, and whether it normalises.
SCALES = {"clip_loss": (20.0, False), "nt_xent": (1 / 0.2, True), "moco_loss": (1 / 0.07, True),
          "info_nce_unnormalized": (1 / 0.3, False)}


def _max_logit(case, inputs):
    """A bound on |s_ij| (Cauchy-Schwarz): sets the rounding tolerance of the scores."""
    scale, normalized = SCALES.get(case, (1 / 0.3, True))
    if normalized:
        return scale
    norms = [float(t.detach().norm(dim=-1).max()) for t in inputs.values()
             if t.is_floating_point()]
    return scale * max(norms) ** 2


def _value_and_grads(call, inputs, backend, eps, weight):
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    loss = call(inputs, backend, eps)
    total = (loss * weight).sum() if loss.dim() else loss
    return loss, dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n,d", [(1, 3), (9, 16), (257, 3)], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_every_backend_matches_the_float64_reference(backend, case, n, d, dtype):
    _skip(backend, dtype, n)
    if case in TWO_ROWS and n < 2:
        pytest.skip("exclude_self needs two rows")
    if dtype in (torch.float16, torch.bfloat16) and n > 9 and backend != "triton":
        pytest.skip("half precision checked on the small shapes (the CPU upcasts anyway)")
    call, make = CASES[case]
    device = device_for(backend)
    inputs = make(n, d, dtype, device)
    loss, grads = _value_and_grads(call, inputs, backend, 0.2, None)
    inputs64 = {k: (as_float64(v)[0].cpu() if v.is_floating_point() else v.cpu())
                for k, v in inputs.items()}
    ref, ref_grads = _value_and_grads(call, inputs64, "reference", 0.2, None)
    # The same reference in the test dtype: plain PyTorch's own error (the baseline).
    inputs_lp = {k: (v.detach().cpu().requires_grad_(True) if v.is_floating_point() else v.cpu())
                 for k, v in inputs.items()}
    base, base_grads = _value_and_grads(call, inputs_lp, "reference", 0.2, None)
    max_logit = _max_logit(case, inputs64)
    assert loss.dtype == dtype
    assert_close(loss, ref, dtype, f"{backend}/{case} loss", max_logit=max_logit, baseline=base)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], dtype, f"{backend}/{case} d{name}",
                     max_logit=max_logit, baseline=base_grads[name])


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_match_the_reference(backend, case, reduction):
    _skip(backend)
    call, make = CASES[case]
    device = device_for(backend)
    inputs = make(7, 5, torch.float64 if backend != "triton" else torch.float32, device)

    def reduced(t, be, eps):
        name = case.split("_")[0]
        if name in ("clip", "nt", "moco"):
            fn = {"clip": fc.clip_loss, "nt": fc.nt_xent, "moco": fc.moco_loss}[name]
            args = (t["a"], t["b"], 20.0) if name == "clip" else (
                (t["a"], t["b"]) if name == "nt" else (t["query"], t["key"], t["negatives"]))
            return fn(*args, label_smoothing=eps, reduction=reduction, backend=be)
        extra = {k: v for k, v in t.items() if k not in ("query", "key", "negatives")}
        options = dict(exclude_self="exclude_self" in case, symmetric="symmetric" in case,
                       normalize="unnormalized" not in case)
        return fc.info_nce(t["query"], t["key"], t.get("negatives"), temperature=0.3,
                           label_smoothing=eps, reduction=reduction, backend=be, **extra,
                           **options)

    loss, grads = _value_and_grads(reduced, inputs, backend, 0.35, 0.5)
    inputs64 = {k: (as_float64(v)[0].cpu() if v.is_floating_point() else v.cpu())
                for k, v in inputs.items()}
    ref, ref_grads = _value_and_grads(reduced, inputs64, "reference", 0.35, 0.5)
    dtype = loss.dtype
    assert_close(loss, ref, dtype, f"{case} loss", max_logit=20.0)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], dtype, f"{case} d{name}", max_logit=20.0)


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_equals_cross_entropy_with_label_smoothing(backend, eps):
    device, dtype = _usable_device_and_dtype(backend)
    q, k = _rand(11, 6, dtype=dtype, device=device), _rand(15, 6, dtype=dtype, device=device)
    targets = torch.randint(0, 15, (11,), device=device)
    loss = fc.info_nce(q, k, temperature=0.25, targets=targets, label_smoothing=eps,
                       backend=backend)
    logits = F.normalize(q.double(), dim=-1) @ F.normalize(k.double(), dim=-1).T / 0.25
    expected = F.cross_entropy(logits, targets, label_smoothing=eps)
    assert_close(loss, expected, dtype, "loss", max_logit=4.0)
    grad = torch.autograd.grad(loss, q)[0]
    expected_grad = torch.autograd.grad(expected, q)[0]
    assert_close(grad, expected_grad, dtype, "dquery", max_logit=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_loss_equals_open_clip_formula_with_label_smoothing(backend):
    device, dtype = _usable_device_and_dtype(backend)
    image, text = _rand(13, 8, dtype=dtype, device=device), _rand(13, 8, dtype=dtype, device=device)
    loss = fc.clip_loss(image, text, 10.0, label_smoothing=0.15, backend=backend)
    logits = 10.0 * image.double() @ text.double().T
    labels = torch.arange(13, device=device)
    expected = 0.5 * (F.cross_entropy(logits, labels, label_smoothing=0.15)
                      + F.cross_entropy(logits.T, labels, label_smoothing=0.15))
    assert_close(loss, expected, dtype, "loss", max_logit=float(logits.detach().abs().max()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_moco_classes_are_the_positive_and_the_queue(backend):
    device, dtype = _usable_device_and_dtype(backend)
    q, k = _rand(10, 5, dtype=dtype, device=device), _rand(10, 5, dtype=dtype, device=device)
    queue = _rand(17, 5, dtype=dtype, device=device)
    loss = fc.moco_loss(q, k, queue, temperature=0.1, label_smoothing=0.3, backend=backend)
    qn, kn, un = (F.normalize(t.double(), dim=-1) for t in (q, k, queue))
    logits = torch.cat([(qn * kn).sum(-1, keepdim=True), qn @ un.T], dim=1) / 0.1
    expected = F.cross_entropy(logits, torch.zeros(10, dtype=torch.long, device=device),
                               label_smoothing=0.3)
    assert_close(loss, expected, dtype, "loss", max_logit=10.0)


def test_masked_entries_are_not_classes():
    """nt_xent: self is no class, so the smoothing term averages over the 2N - 1 other views
    (F.cross_entropy on the -inf diagonal would give inf)."""
    z1, z2 = torch.randn(2, 5, 4, dtype=torch.float64)
    loss = fc.nt_xent(z1, z2, temperature=0.5, label_smoothing=0.2, backend="cpu"
                      if backend_usable("cpu") else "torch")
    assert torch.isfinite(loss)
    assert_close(loss, nt_xent_reference(z1, z2, temperature=0.5, label_smoothing=0.2),
                 torch.float64, "loss")
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    logits = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
    targets = (torch.arange(10) + 5) % 10
    assert torch.isinf(F.cross_entropy(logits, targets, label_smoothing=0.2))


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("case", ["info_nce_bank_with_ids", "info_nce_symmetric", "nt_xent",
                                  "info_nce_per_query"])
def test_gradcheck_float64(backend, case):
    _skip(backend)
    call, make = CASES[case]
    inputs = make(5, 3, torch.float64, "cpu")
    leaves = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        return call({**inputs, **dict(zip(leaves, tensors))}, backend, 0.3)

    assert torch.autograd.gradcheck(fn, [inputs[k] for k in leaves])


def test_zero_smoothing_is_the_plain_loss_and_tensor_temperature_gets_a_gradient():
    q, k = torch.randn(2, 8, 6, dtype=torch.float64)
    tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    plain = fc.info_nce(q, k, temperature=tau)
    assert torch.equal(fc.info_nce(q, k, temperature=tau, label_smoothing=0.0), plain)
    smoothed = fc.info_nce(q, k, temperature=tau, label_smoothing=0.5)
    ref = fc.info_nce(q, k, temperature=tau, label_smoothing=0.5, backend="reference")
    (grad,) = torch.autograd.grad(smoothed, tau)
    (ref_grad,) = torch.autograd.grad(ref, tau)
    assert_close(grad, ref_grad, torch.float64, "dtemperature")


@pytest.mark.parametrize("value, error, match", [
    (-0.1, ValueError, r"label_smoothing must be finite and >= 0, got -0.1"),
    (1.5, ValueError, r"label_smoothing must be in \[0, 1\], got 1.5"),
    ("0.1", TypeError, r"label_smoothing must be a float, got str"),
    (float("nan"), ValueError, r"label_smoothing must be finite")])
def test_bad_label_smoothing_is_refused(value, error, match):
    q, k = torch.randn(2, 4, 3)
    for call in (lambda: fc.info_nce(q, k, label_smoothing=value),
                 lambda: fc.clip_loss(q, k, 10.0, label_smoothing=value),
                 lambda: fc.nt_xent(q, k, label_smoothing=value),
                 lambda: fc.moco_loss(q, k, k, label_smoothing=value)):
        with pytest.raises(error, match=match):
            call()


@pytest.mark.parametrize("objective", [dict(decoupled=True), dict(hcl_beta=0.5),
                                       dict(decoupled=True, dclw_sigma=0.5)])
def test_label_smoothing_needs_the_positive_among_the_candidates(objective):
    q, k = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="label_smoothing needs the positive among the "
                                         "candidates"):
        fc.info_nce(q, k, label_smoothing=0.1, **objective)
    with pytest.raises(ValueError, match="label_smoothing needs the positive"):
        fc.nt_xent(q, k, label_smoothing=0.1, **objective)


def test_module_twins_take_label_smoothing():
    q, k = torch.randn(2, 6, 4)
    assert torch.equal(fc.InfoNCELoss(0.2, label_smoothing=0.1)(q, k),
                       fc.info_nce(q, k, temperature=0.2, label_smoothing=0.1))
    assert torch.equal(fc.NTXentLoss(0.2, label_smoothing=0.1)(q, k),
                       fc.nt_xent(q, k, temperature=0.2, label_smoothing=0.1))
    assert torch.equal(fc.MoCoLoss(0.2, label_smoothing=0.1)(q, k, k),
                       fc.moco_loss(q, k, k, temperature=0.2, label_smoothing=0.1))
    clip = fc.ClipLoss(10.0, learnable=False, label_smoothing=0.1)
    assert torch.equal(clip(q, k), fc.clip_loss(q, k, clip.logit_scale, label_smoothing=0.1))
    assert "label_smoothing=0.1" in repr(clip) and "label_smoothing" in repr(
        fc.InfoNCELoss(label_smoothing=0.1))
    assert "label_smoothing" not in repr(fc.InfoNCELoss())



@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiles_with_changing_batch_sizes(backend):
    _skip(backend)

    def step(q, k):
        return fc.info_nce(q, k, temperature=0.2, label_smoothing=0.1, backend=backend)

    assert_compiles_with_changing_batch_sizes(step, 2)
