"""Regressions of "never a silent wrong answer": one test (or a small parametrized group) per case
of the numerics issue, on every available backend (triton only where the shapes are tiny).

 1. NaN / inf inputs propagate into the loss and gradients exactly as in the reference.
 2. Double backward gives the reference's second-order gradients or raises (never first-order).
 3. In-place edits of inputs after the forward raise autograd's version-counter error.
 4. Half-precision temperature / logit_scale tensors: the scalar is used at fp32 (fp64) precision.
 5. Rows whose only candidate is the positive give exactly 0, and no loss is ever below 0.
 6. Rows with no candidate at all give 0, are left out of the mean and get zero gradient.
 7. HCL with a large beta at a small temperature stays finite and accurate in fp32.
Elsewhere: autocast (test_autocast.py), gradcheck without nondet_tol and retain_graph twice
(test_gradcheck.py), the module reprs (test_modules.py), the loss-specific error messages and
siglip's huge logit_scale (tests/losses/test_<loss>.py).
"""
import math

import pytest
import torch

import fastcontrast

from ..._helpers import assert_close, device_for
from .._cases import (ALL_BACKENDS, CASES, REDUCTIONS, assert_same, copies, dtype_for,
                      float_backends, grads, leaf, queue_of, run)

# ---------------------------------------------------------------------------------------------
# 1. NaN / inf propagate exactly as in the reference


def _variant(name, **options):
    """(shapes, call(features, **kw)) of the loss ``name`` with extra ``options``."""
    case = CASES[name]
    return case.shapes, lambda f, **kw: case.call(f, case.scalars, **options, **kw)


def _info_nce_with(negatives_shape, **options):
    """info_nce with negatives of ``negatives_shape(n, d)``."""
    return (lambda n, d: [(n, d), (n, d), negatives_shape(n, d)],
            lambda f, **kw: fastcontrast.info_nce(*f, temperature=0.2, **options, **kw))


VARIANTS = {
    **{name: _variant(name) for name in CASES},
    "info_nce_unnormalized": _variant("info_nce", normalize=False),
    "moco_loss_unnormalized": _variant("moco_loss", normalize=False),
    "info_nce_bank": _info_nce_with(lambda n, d: (5, d)),
    "info_nce_queue_only": _info_nce_with(lambda n, d: (5, d), in_batch_negatives=False),
    "info_nce_per_query_only": _info_nce_with(lambda n, d: (n, 3, d), in_batch_negatives=False),
}


def _variant_inputs(variant, n, d, dtype, device):
    """Fresh leaves (requiring grad) of the variant's (or loss's) feature shapes."""
    return [leaf(*shape, dtype=dtype, device=device) for shape in VARIANTS[variant][0](n, d)]


NONFINITE = {
    # scenario: (variant, input poisoned, its entry, value)
    "moco_nan_queue_entry": ("moco_loss", 2, (2, 0), math.nan),
    "info_nce_nan_key": ("info_nce", 1, (1, 0), math.nan),
    "info_nce_nan_key_queue_only": ("info_nce_queue_only", 1, (1, 0), math.nan),
    "info_nce_nan_per_query_negative": ("info_nce_per_query_only", 2, (2, 1, 0), math.nan),
    "clip_loss_nan_image_row": ("clip_loss", 0, (1, 2), math.nan),
    "nt_xent_nan_view": ("nt_xent", 1, (3, 1), math.nan),
    "supcon_nan_feature": ("supcon", 0, (2, 0), math.nan),
    "siglip_nan_text_row": ("siglip_loss", 1, (0, 1), math.nan),
    "info_nce_inf_key_unnormalized": ("info_nce_unnormalized", 1, (2, 1), math.inf),
    "moco_inf_queue_unnormalized": ("moco_loss_unnormalized", 2, (1, 0), -math.inf),
}


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("scenario", list(NONFINITE))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_nonfinite_inputs_propagate_as_in_reference(backend, scenario, reduction):
    variant, which, index, value = NONFINITE[scenario]
    call = VARIANTS[variant][1]
    dtype, device = dtype_for(backend), device_for(backend)
    features = _variant_inputs(variant, 4, 3, dtype, device)
    with torch.no_grad():
        features[which][index] = value
        if math.isinf(value) and which != 0:
            # An infinite entry poisons the loss only through a score of +inf: query row 0 gets
            # the sign that makes its score with the entry +inf, whatever the seed.
            column = index[-1]
            features[0][0, column] = math.copysign(abs(float(features[0][0, column])), value)
    weights = torch.rand(8, dtype=torch.float64)

    def loss_and_grads(tensors, on):
        loss = call(tensors, reduction=reduction, backend=on)
        total = loss if reduction == "mean" else (loss * weights[:loss.shape[0]].to(loss)).sum()
        total.backward()
        return loss, grads(tensors)

    expected, expected_grads = loss_and_grads(copies(features), "reference")
    assert not torch.isfinite(expected).all()  # the scenario does poison the loss
    loss, backend_grads = loss_and_grads(features, backend)
    assert_same(loss, expected, dtype, f"{scenario} loss")
    for i, (g, r) in enumerate(zip(backend_grads, expected_grads)):
        if math.isinf(value) and g is not None and r is not None:
            # An inf input reaches a gradient as p * inf: NaN where p is exactly 0 (IEEE), but a
            # BLAS may skip the zero products of the reference's matmul and give +-inf there.
            # So for inf inputs the non-finite places must agree, the finite values must match.
            assert torch.equal(torch.isfinite(g), torch.isfinite(r)), f"{scenario} grad[{i}]"
            finite = torch.isfinite(r)
            g, r = torch.where(finite, g, 0), torch.where(finite, r, 0)
        assert_same(g, r, dtype, f"{scenario} grad[{i}]")


# ---------------------------------------------------------------------------------------------
# 2. Double backward: the reference's second-order gradients, or a RuntimeError naming the
# backend and backend="reference" when the second-order graph is used


DOUBLE_BACKWARD = {
    "info_nce": ("info_nce", None),
    "nt_xent": ("nt_xent", None),
    "siglip_loss": ("siglip_loss", None),
    "clip_loss_image_only": ("clip_loss", 1),  # text does not require grad
    "supcon": ("supcon", None),
}


def _second_order(name, features, backend, frozen):
    """loss + 10 |d loss / d features[0]|^2, backward: the second-order gradients."""
    if frozen is not None:
        features[frozen].requires_grad_(False)
    loss = run(name, features, backend)
    g, = torch.autograd.grad(loss, features[0], create_graph=True)
    return loss, g, lambda: (loss + 10 * (g ** 2).sum()).backward()


@pytest.mark.parametrize("scenario", list(DOUBLE_BACKWARD))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_double_backward_is_exact_or_refused(backend, scenario):
    name, frozen = DOUBLE_BACKWARD[scenario]
    dtype, device = dtype_for(backend), device_for(backend)
    features = _variant_inputs(name, 5, 3, dtype, device)
    reference = copies(features)
    _, _, second = _second_order(name, reference, "reference", frozen)
    second()
    _, _, second = _second_order(name, features, backend, frozen)  # first order: must work
    try:
        second()
    except RuntimeError as error:
        message = str(error)
        assert "double backward" in message.lower(), message
        assert backend in message, message
        assert 'backend="reference"' in message or "backend='reference'" in message, message
        return
    for i, (g, r) in enumerate(zip(grads(features), grads(reference))):
        assert_same(g, r, dtype, f"{scenario} second-order grad[{i}]")


# ---------------------------------------------------------------------------------------------
# 3. In-place edits after the forward raise the version-counter error


def _edited_after_forward(variant, backend, reduction, which):
    """Backward after ``features[which].mul_(2)`` following the forward: the gradients, or the
    RuntimeError autograd raised; and the gradients of the values the forward saw."""
    dtype, device = dtype_for(backend), device_for(backend)
    features = _variant_inputs(variant, 4, 3, dtype, device)
    before = copies(features)
    VARIANTS[variant][1](before, backend="reference", reduction=reduction).sum().backward()
    loss = VARIANTS[variant][1](features, backend=backend, reduction=reduction)
    with torch.no_grad():
        features[which].mul_(2.0)
    try:
        loss.sum().backward()
    except RuntimeError as error:
        return error, grads(before)
    return grads(features), grads(before)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_inplace_edit_after_forward_raises(backend, variant, reduction):
    """Autograd's version-counter error wherever the reference raises it (it saved the edited
    tensor); where the reference saved a copy (nt_xent's concatenation), the gradients of the
    values the forward saw, or that same error."""
    for which in range(len(VARIANTS[variant][0](4, 3))):
        reference, _ = _edited_after_forward(variant, "reference", reduction, which)
        result, expected = _edited_after_forward(variant, backend, reduction, which)
        if isinstance(reference, RuntimeError) or isinstance(result, RuntimeError):
            assert isinstance(result, RuntimeError), f"input {which}: no error after the edit"
            assert "modified by an inplace operation" in str(result), str(result)
            continue
        for i, (g, r) in enumerate(zip(result, expected)):
            assert_same(g, r, dtype_for(backend), f"input {which} edited: grad[{i}]")


# ---------------------------------------------------------------------------------------------
# 4. Half-precision temperature / logit_scale: inverted and used in fp32 (fp64)


HALF_SCALARS = [torch.float16, torch.bfloat16]
INPUT_DTYPES = [torch.float32, torch.float64]
BACKEND_DTYPE = [(b, d) for d in INPUT_DTYPES for b in float_backends(d)]


def _rounded_reference(module, features, which):
    """The module's loss in float64 with its scalar's (rounded) value, and the float64 gradient
    of the module's log-parameter (through exp, at the rounded scalar)."""
    image, text = copies(features)
    if which == "info_nce":
        value = float(module.temperature.detach())
        log_value = torch.tensor(-math.log(value), dtype=torch.float64, requires_grad=True)
        loss = fastcontrast.info_nce(image, text, temperature=torch.exp(-log_value),
                                     backend="reference")
    elif which == "clip":
        value = float(module.logit_scale.detach())
        log_value = torch.tensor(math.log(value), dtype=torch.float64, requires_grad=True)
        loss = fastcontrast.clip_loss(image, text, torch.exp(log_value), backend="reference")
    else:
        value = float(module.log_logit_scale.detach().exp())
        log_value = torch.tensor(math.log(value), dtype=torch.float64, requires_grad=True)
        loss = fastcontrast.siglip_loss(image, text, torch.exp(log_value),
                                        float(module.logit_bias), backend="reference")
    loss.backward()
    return loss, log_value.grad


HALF_MODULES = {
    "info_nce": lambda backend: fastcontrast.InfoNCELoss(learn_temperature=True, backend=backend),
    "clip": lambda backend: fastcontrast.ClipLoss(backend=backend),
    "siglip": lambda backend: fastcontrast.SigLIPLoss(init_logit_scale=2.0, init_logit_bias=-1.0,
                                                      backend=backend),
}


@pytest.mark.parametrize("half", HALF_SCALARS)
@pytest.mark.parametrize("which", list(HALF_MODULES))
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPE)
def test_half_precision_scalar_module(backend, dtype, which, half):
    device = device_for(backend)
    module = HALF_MODULES[which](backend).to(half)
    features = [leaf(9, 3, dtype=dtype, device=device) for _ in range(2)]
    loss = module(*features)
    loss.backward()
    expected, expected_grad = _rounded_reference(module, features, which)
    assert loss.dtype == dtype
    assert_same(loss, expected, dtype, f"{which} loss with a {half} scalar")
    param = next(module.parameters())
    assert param.grad.dtype == half
    torch.testing.assert_close(param.grad.double(), expected_grad, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("half", HALF_SCALARS)
@pytest.mark.parametrize("backend, dtype", BACKEND_DTYPE)
def test_half_precision_scalar_functional(backend, dtype, half):
    device = device_for(backend)
    image, text = (leaf(9, 3, dtype=dtype, device=device) for _ in range(2))
    scale = torch.tensor(1 / 0.07, dtype=half, device=device)
    temperature = torch.tensor(0.07, dtype=half, device=device)
    image64, text64 = copies([image, text])
    for loss, expected in (
            (fastcontrast.clip_loss(image, text, scale, backend=backend),
             fastcontrast.clip_loss(image64, text64, float(scale), backend="reference")),
            (fastcontrast.info_nce(image, text, temperature=temperature, backend=backend),
             fastcontrast.info_nce(image64, text64, temperature=float(temperature),
                                   backend="reference"))):
        assert loss.dtype == dtype
        assert_same(loss, expected, dtype, f"loss with a {half} scalar")


# ---------------------------------------------------------------------------------------------
# 5. Rows whose only candidate is the positive: exactly 0; and never below 0


def _moco_own_instance_only(f, **kw):
    """moco_loss of query 0 (index 5) with a queue holding only entries of instance 5."""
    device = f[0].device
    queue = queue_of(f[1][1:3], torch.tensor([5, 5], device=device))
    return fastcontrast.moco_loss(f[0][:1], f[1][:1], queue,
                                  query_index=torch.tensor([5], device=device), **kw)


ONLY_POSITIVE = {
    "info_nce_n1": lambda f, **kw: fastcontrast.info_nce(f[0][:1], f[1][:1], **kw),
    "info_nce_symmetric_n1": lambda f, **kw: fastcontrast.info_nce(f[0][:1], f[1][:1],
                                                                   symmetric=True, **kw),
    "info_nce_no_in_batch_negatives": lambda f, **kw: fastcontrast.info_nce(
        f[0], f[1], in_batch_negatives=False, **kw),
    "info_nce_unnormalized_targets": lambda f, **kw: fastcontrast.info_nce(
        f[0], f[1], targets=torch.arange(4, 0, -1, device=f[0].device) - 1,
        in_batch_negatives=False, normalize=False, temperature=0.01, **kw),
    "clip_loss_n1": lambda f, **kw: fastcontrast.clip_loss(f[0][:1], f[1][:1], 50.0, **kw),
    "nt_xent_n1": lambda f, **kw: fastcontrast.nt_xent(f[0][:1], f[1][:1], **kw),
    "supcon_pair": lambda f, **kw: fastcontrast.supcon(
        f[0][:2], torch.zeros(2, dtype=torch.int64, device=f[0].device), **kw),
    "moco_own_instance_only": _moco_own_instance_only,
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("scenario", list(ONLY_POSITIVE))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_only_the_positive_gives_exactly_zero(backend, scenario, reduction):
    dtype, device = dtype_for(backend), device_for(backend)
    for dt in dict.fromkeys((dtype, torch.float32)):
        features = [leaf(4, 3, dtype=dt, device=device, scale=3.0) for _ in range(2)]
        loss = ONLY_POSITIVE[scenario](features, reduction=reduction, backend=backend)
        assert loss.dtype == dt
        assert torch.equal(loss, torch.zeros_like(loss)), f"{scenario} ({dt}): {loss}"
        loss.sum().backward()
        # ~0: (p_positive - 1) is rounding at logits up to 50 |x|^2 (clip's scale, the largest)
        bound = 1e-3 * 50 * float(features[0].detach().abs().max())
        for g in grads(features):
            assert g is None or torch.isfinite(g).all() and float(g.abs().max()) <= bound, (
                f"{scenario} ({dt}) gradient {g}")


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_loss_never_below_zero_with_dominant_positives(backend, name):
    """Identical, large positives at a small temperature: every row's loss is tiny but >= 0."""
    device = device_for(backend)
    x = leaf(16, 64, dtype=torch.float32, device=device, scale=4.0)
    features = [x, x.detach().clone()][:len(CASES[name].shapes(16, 64))]
    if name == "moco_loss":
        features.append(leaf(5, 64, dtype=torch.float32, device=device))
    scalars = {"clip_loss": (100.0,), "siglip_loss": (100.0, 0.0)}.get(name, (0.01,))
    if name == "clip_loss":  # unit rows, as CLIP's normalised features
        features = [torch.nn.functional.normalize(t.detach(), dim=1) for t in features]
    loss = run(name, features, backend, scalars=scalars, reduction="none")
    assert torch.isfinite(loss).all()
    assert bool((loss >= 0).all()), f"{name}: negative losses {loss[loss < 0].tolist()}"


# ---------------------------------------------------------------------------------------------
# 6. Rows with no candidate at all: 0, left out of the mean, zero gradient


NO_CANDIDATE_OBJECTIVES = {
    "dcl": dict(decoupled=True),
    "dclw": dict(decoupled=True, dclw_sigma=0.5),
    "hcl_decoupled": dict(decoupled=True, hcl_beta=1.0, hcl_tau_plus=0.1),
}
NO_CANDIDATE = {
    "nt_xent_n1": lambda f, **kw: fastcontrast.nt_xent(f[0][:1], f[1][:1], **kw),
    "info_nce_n1": lambda f, **kw: fastcontrast.info_nce(f[0][:1], f[1][:1], **kw),
    "info_nce_no_negatives": lambda f, **kw: fastcontrast.info_nce(
        f[0], f[1], in_batch_negatives=False, **kw),
    "moco_own_instance_only": _moco_own_instance_only,
}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("objective", list(NO_CANDIDATE_OBJECTIVES))
@pytest.mark.parametrize("scenario", list(NO_CANDIDATE))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_without_candidates_give_zero(backend, scenario, objective, reduction):
    options = NO_CANDIDATE_OBJECTIVES[objective]
    if scenario.startswith("moco") and "dclw_sigma" in options:
        pytest.skip("moco_loss has no dclw_sigma")
    dtype, device = dtype_for(backend), device_for(backend)
    features = [leaf(4, 3, dtype=dtype, device=device) for _ in range(2)]
    loss = NO_CANDIDATE[scenario](features, reduction=reduction, backend=backend, **options)
    assert loss.dtype == dtype
    assert torch.equal(loss, torch.zeros_like(loss)), f"{scenario}/{objective}: {loss}"
    loss.sum().backward()
    for g in grads(features):
        assert g is None or torch.equal(g, torch.zeros_like(g)), f"gradient {g}"


def _mixed_call(features, ids, backend, reduction):
    """info_nce with a bank whose entries all carry id 7: query 0 (id 7) has no candidate under
    DCL, queries 1 and 2 (ids 8, 9) see the whole bank."""
    q, k, bank = features
    return fastcontrast.info_nce(q, k, bank, in_batch_negatives=False, decoupled=True,
                                 query_ids=ids[0], negative_ids=ids[1], reduction=reduction,
                                 temperature=0.3, backend=backend)


def _mixed_moco(features, ids, backend, reduction):
    """moco_loss (DCL) whose queue holds only instance 7: query 0 (index 7) has no candidate."""
    q, k, keys = features
    queue = queue_of(keys, torch.full((keys.shape[0],), 7, device=q.device))
    return fastcontrast.moco_loss(q, k, queue, query_index=ids[0], decoupled=True,
                                  reduction=reduction, temperature=0.3, backend=backend)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("call", [_mixed_call, _mixed_moco], ids=["info_nce_ids", "moco_queue"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_rows_without_candidates_are_left_out_of_the_mean(backend, call, reduction):
    dtype, device = dtype_for(backend), device_for(backend)
    q, k, bank = (leaf(3, 4, dtype=dtype, device=device), leaf(3, 4, dtype=dtype, device=device),
                  leaf(2, 4, dtype=dtype, device=device))
    if call is _mixed_moco:
        bank.requires_grad_(False)
    query_ids = torch.tensor([7, 8, 9], device=device)
    bank_ids = torch.tensor([7, 7], device=device)
    loss = call([q, k, bank], (query_ids, bank_ids), backend, reduction)
    loss.sum().backward()
    # Rows 1 and 2 alone, without ids: every bank entry is a negative.
    sub = copies([q, k, bank])
    rows = fastcontrast.info_nce(sub[0][1:], sub[1][1:], sub[2], in_batch_negatives=False,
                                 decoupled=True, reduction="none", temperature=0.3,
                                 backend="reference")
    expected = {"none": torch.cat([rows.new_zeros(1), rows]), "sum": rows.sum(),
                "mean": rows.mean()}[reduction]
    expected.sum().backward()
    assert_same(loss, expected, dtype, "loss")
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert torch.equal(k.grad[0], torch.zeros_like(k.grad[0]))
    assert_same(q.grad[1:], sub[0].grad[1:], dtype, "dq")
    assert_same(k.grad[1:], sub[1].grad[1:], dtype, "dk")
    if bank.requires_grad:
        assert_same(bank.grad, sub[2].grad, dtype, "dbank")


# ---------------------------------------------------------------------------------------------
# 7. HCL at a large beta and a small temperature in fp32


@pytest.mark.parametrize("loss_fn", ["info_nce", "nt_xent"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_hcl_large_beta_small_temperature_fp32_is_finite(backend, loss_fn):
    device = device_for(backend)
    features = [leaf(8, 16, dtype=torch.float32, device=device) for _ in range(2)]
    options = dict(hcl_beta=10.0, hcl_tau_plus=0.1, temperature=0.05)
    fn = getattr(fastcontrast, loss_fn)
    loss = fn(*features, backend=backend, **options)
    loss.backward()
    reference = copies(features)
    expected = fn(*reference, backend="reference", **options)
    expected.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads(features))
    max_logit = (1 + 10.0) / 0.05
    assert_close(loss, expected, torch.float32, "hcl loss", max_logit=max_logit)
    for i, (g, r) in enumerate(zip(grads(features), grads(reference))):
        assert_close(g, r, torch.float32, f"hcl grad[{i}]", max_logit=max_logit)


