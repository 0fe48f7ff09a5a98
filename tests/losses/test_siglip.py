"""SigLIP's sigmoid loss: every backend against the float64 reference (values and the gradients
of image, text, logit_scale, logit_bias) over odd shapes x dtypes x reductions, large logits,
tiny loss terms, gradcheck, frozen inputs, no_grad, the SigLIPLoss module, the multi-tile paths
of each backend, and bad input. The properties every loss shares: tests/losses/contract/."""

import math

import pytest
import torch

import fastcontrast
from fastcontrast import backends
from fastcontrast.functional import siglip_loss
from fastcontrast.reference import siglip_loss_reference

from .._helpers import (
    FUSED_BACKENDS,
    assert_close,
    backend_usable,
    device_for,
    interpreting_triton,
)
from ._cases import DTYPES, float_backends, log_parameter_grad

SHAPES = [(1, 3), (7, 64), (33, 3), (257, 1000)]


def _skip_unsupported(backend, n, d, dtype):
    if backend != "auto" and not backend_usable(backend, device_for(backend)):
        pytest.skip(f"backend {backend!r} unavailable here")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton refuses float64 (test_triton_refuses_float64)")
    if interpreting_triton(backend) and dtype == torch.bfloat16 and n > 7:
        pytest.skip("bf16 in the Triton interpreter is emulated slowly; small shapes only")


def _features(n, d, dtype, device, *, norm=1.0, correlated=True):
    """image, text (n, d) with rows of norm ~``norm``; text i correlated with image i, so the
    positives sit on the other side of the sigmoid than the negatives."""
    image = torch.randn(n, d, dtype=torch.float64) * (norm / math.sqrt(d))
    noise = torch.randn(n, d, dtype=torch.float64) * (norm / math.sqrt(d))
    text = 0.8 * image + 0.6 * noise if correlated else noise
    return [t.to(dtype=dtype, device=device).requires_grad_() for t in (image, text)]


def _params(scale, bias, device, requires_grad=True):
    return [
        torch.tensor(v, dtype=torch.float32, device=device, requires_grad=requires_grad)
        for v in (scale, bias)
    ]


def _loss_and_grads(fn, inputs, reduction):
    loss = fn(*inputs)
    weight = torch.linspace(-1, 2, inputs[0].shape[0], dtype=loss.dtype, device=loss.device)
    total = (loss * weight).sum() if reduction == "none" else 1.5 * loss
    wanted = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return loss, torch.autograd.grad(total, wanted)


def _conditioning(image, text, scale, bias, reduction):
    """float64 (max |z|, sum_ij |dz_ij <x_i, y_j>|, sum_ij |dz_ij|): the logit size that sets the
    rounding of the loss, and the magnitudes whose cancellation sets the rounding of d scale and
    d bias (their exact values can be far smaller than the terms they sum)."""
    with torch.no_grad():
        x, y = image.detach().double().cpu(), text.detach().double().cpu()
        dots = x @ y.T
        z = float(scale) * dots + float(bias)
        labels = 2 * torch.eye(x.shape[0], dtype=torch.float64) - 1
        g = 1.0 / x.shape[0] if reduction == "mean" else 2.0
        dz = g * torch.sigmoid(-labels * z)
        return float(z.abs().max()), float((dz * dots.abs()).sum()), float(dz.sum())


def _copies(inputs, dtype=None):
    """Detached copies (float64 when ``dtype``) keeping requires_grad; plain floats pass through."""
    return [
        t.detach().cpu().to(dtype or t.dtype).requires_grad_(t.requires_grad)
        if isinstance(t, torch.Tensor)
        else t
        for t in inputs
    ]


def check_against_reference(backend, image, text, scale, bias, reduction, dtype):
    inputs = [image, text, scale, bias]
    loss, grads = _loss_and_grads(
        lambda *a: siglip_loss(*a, reduction=reduction, backend=backend), inputs, reduction
    )
    ref, ref_grads = _loss_and_grads(
        lambda *a: siglip_loss_reference(*a, reduction=reduction),
        _copies(inputs, torch.float64),
        reduction,
    )
    # The same reference computed in the test dtype on the CPU: the error baseline.
    base, base_grads = _loss_and_grads(
        lambda *a: siglip_loss_reference(*a, reduction=reduction), _copies(inputs), reduction
    )
    assert loss.dtype == dtype and loss.shape == ref.shape
    max_logit, dscale_terms, dbias_terms = _conditioning(image, text, scale, bias, reduction)
    assert_close(loss, ref, dtype, f"{backend} loss", max_logit=max_logit, baseline=base)
    names = ("image", "text", "logit_scale", "logit_bias")
    scales = (None, None, max(1.0, dscale_terms), max(1.0, dbias_terms))
    trained = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.requires_grad]
    assert len(grads) == len(trained)
    for i, grad, ref_grad, base_grad in zip(trained, grads, ref_grads, base_grads):
        assert grad.dtype == inputs[i].dtype, f"d{names[i]} dtype {grad.dtype}"
        assert_close(
            grad,
            ref_grad,
            dtype,
            f"{backend} d{names[i]}",
            max_logit=max_logit,
            baseline=base_grad,
            scale=scales[i],
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n,d", SHAPES, ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_matches_reference(backend, n, d, dtype):
    _skip_unsupported(backend, n, d, dtype)
    device = device_for(backend)
    image, text = _features(n, d, dtype, device)
    scale, bias = _params(10.0, -10.0, device)  # OpenCLIP's SigLIP initialisation
    check_against_reference(backend, image, text, scale, bias, "mean", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=lambda t: str(t)[6:])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_reductions(backend, reduction, dtype):
    _skip_unsupported(backend, 33, 16, dtype)
    device = device_for(backend)
    image, text = _features(33, 16, dtype, device, norm=2.0)
    scale, bias = _params(3.0, 1.5, device)
    check_against_reference(backend, image, text, scale, bias, reduction, dtype)


@pytest.mark.parametrize("scale_value,bias_value", [(100.0, 0.0), (1.0, -5000.0), (50.0, 3000.0)])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_large_logits(backend, scale_value, bias_value):
    """|z| up to ~1e4: no overflow, no NaN, every term saturated; fp32 against float64."""
    _skip_unsupported(backend, 31, 16, torch.float32)
    device = device_for(backend)
    image, text = _features(31, 16, torch.float32, device, norm=10.0)
    scale, bias = _params(scale_value, bias_value, device)
    max_logit = _conditioning(image, text, scale, bias, "mean")[0]
    assert max_logit > 2000  # the case is what it claims to be
    check_against_reference(backend, image, text, scale, bias, "mean", torch.float32)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_tiny_terms_keep_relative_precision(backend):
    """Every pair far on the correct side (z_ii >> 0, z_ij << 0): each term is ~1e-13 and the
    loss must still be right to fp32 relative precision (a naive log(1 + exp(t)) gives 0)."""
    _skip_unsupported(backend, 40, 64, torch.float32)
    device = device_for(backend)
    image = torch.eye(40, 64, device=device)  # one-hot rows: <image_i, text_j> = [i == j]
    text = torch.eye(40, 64, device=device)
    scale, bias = _params(60.0, -30.0, device)  # z_ii = +30, z_ij = -30: softplus(-30) ~ 9e-14
    loss = siglip_loss(image, text, scale, bias, reduction="none", backend=backend)
    ref = siglip_loss_reference(
        *_copies([image, text, scale, bias], torch.float64), reduction="none"
    ).detach()
    rel = ((loss.detach().double().cpu() - ref) / ref).abs().max()
    assert float(ref.min()) < 1e-11 and float(rel) < 1e-5, f"relative error {float(rel):.3e}"


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck(backend, n, reduction):
    if not backend_usable(backend):
        pytest.skip(f"backend {backend!r} unavailable here")
    dt = torch.float64
    image = torch.randn(n, 3, dtype=dt, requires_grad=True)
    text = torch.randn(n, 3, dtype=dt, requires_grad=True)
    scale = torch.tensor(1.7, dtype=dt, requires_grad=True)
    bias = torch.tensor(-0.8, dtype=dt, requires_grad=True)

    def loss(*args):
        return siglip_loss(*args, reduction=reduction, backend=backend)

    # No nondet_tol: every backward (retained or not) gives bitwise the same gradient.
    assert torch.autograd.gradcheck(loss, (image, text, scale, bias), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


@pytest.mark.parametrize("trainable", ["image", "text", "text_scale", "scale_bias", "bias"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_frozen_inputs(backend, trainable):
    """Only some inputs require grad (a frozen tower, fixed or learnable scale and bias)."""
    _skip_unsupported(backend, 20, 8, torch.float32)
    device = device_for(backend)
    image, text = _features(20, 8, torch.float32, device)
    image.requires_grad_(trainable == "image")
    text.requires_grad_(trainable in ("text", "text_scale"))
    scale, bias = _params(
        5.0, -2.0, device, requires_grad=trainable in ("text_scale", "scale_bias")
    )
    bias.requires_grad_(trainable in ("scale_bias", "bias"))
    if trainable == "image":  # plain floats for scale and bias
        scale, bias = 5.0, -2.0
    check_against_reference(backend, image, text, scale, bias, "mean", torch.float32)


def test_float_scale_and_bias_match_tensors():
    image, text = _features(9, 4, torch.float64, "cpu")
    a = siglip_loss(image, text, 4.0, -1.0, backend="torch")
    b = siglip_loss(image, text, torch.tensor(4.0), torch.tensor(-1.0), backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ("reference", "auto"))
def test_no_grad_and_retain_graph(backend):
    _skip_unsupported(backend, 9, 8, torch.float32)
    device = device_for(backend)
    image, text = _features(9, 8, torch.float32, device)
    scale, bias = _params(4.0, -2.0, device)
    inputs = [image, text, scale, bias]
    with torch.no_grad():
        value = siglip_loss(*inputs, backend=backend)
    assert not value.requires_grad
    loss = siglip_loss(*inputs, backend=backend)
    torch.testing.assert_close(value, loss.detach(), rtol=1e-6, atol=0)
    first = torch.autograd.grad(loss, inputs, retain_graph=True)
    second = torch.autograd.grad(2 * loss, inputs)  # recomputes where the first was fused
    for a, b in zip(first, second):
        torch.testing.assert_close(2 * a, b, rtol=1e-5, atol=1e-7)
    ref = siglip_loss_reference(*_copies(inputs, torch.float64))
    assert_close(loss, ref, torch.float32, f"{backend} loss")


# ---------------------------------------------------------------------------------------------
# The SigLIPLoss module, and a logit_scale past float range


def test_siglip_module_owns_scale_and_bias():
    image, text = torch.randn(6, 5), torch.randn(6, 5)
    module = fastcontrast.SigLIPLoss()
    image64, text64 = image.double(), text.double()
    expected = siglip_loss_reference(image64, text64, 10.0, -10.0)
    torch.testing.assert_close(module(image, text).double(), expected, rtol=1e-5, atol=1e-5)
    module(image, text).backward()
    d_log_scale = log_parameter_grad(
        lambda scale: siglip_loss_reference(image64, text64, scale, -10.0), 10.0)
    bias = torch.tensor(-10.0, dtype=torch.float64, requires_grad=True)
    siglip_loss_reference(image64, text64, 10.0, bias).backward()
    torch.testing.assert_close(module.log_logit_scale.grad.double(), d_log_scale, rtol=1e-4,
                               atol=1e-6)
    torch.testing.assert_close(module.logit_bias.grad.double(), bias.grad, rtol=1e-4, atol=1e-6)
    frozen = fastcontrast.SigLIPLoss(learnable=False)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert torch.allclose(frozen(image, text, logit_scale=2.0, logit_bias=0.5),
                          fastcontrast.siglip_loss(image, text, 2.0, 0.5))
    with pytest.raises(ValueError, match="init_logit_scale"):
        fastcontrast.SigLIPLoss(init_logit_scale=0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_siglip_huge_logit_scale_is_refused_or_agreed_on(dtype):
    """logit_scale = 1e300: ValueError naming logit_scale on every backend, or one value."""
    backends = float_backends(dtype)
    image, text = (torch.randn(5, 3, dtype=dtype) for _ in range(2))
    outcomes = {}
    for backend in backends:
        device = device_for(backend)
        try:
            outcomes[backend] = fastcontrast.siglip_loss(
                image.to(device), text.to(device), 1e300, -10.0, backend=backend).cpu()
        except ValueError as error:
            assert "logit_scale" in str(error), f"{backend}: {error}"
            outcomes[backend] = "ValueError"
    kinds = {b: isinstance(v, str) for b, v in outcomes.items()}
    assert len(set(kinds.values())) == 1, f"some backends raise, others do not: {outcomes}"
    values = [v for v in outcomes.values() if not isinstance(v, str)]
    for backend, value in zip(backends, values):
        torch.testing.assert_close(value, values[0], equal_nan=True, rtol=1e-6, atol=0,
                                   msg=lambda m, b=backend: f"{b} vs {backends[0]}: {m}")


# ---------------------------------------------------------------------------------------------
# The kernels: each backend's own surface on several tiles, and the registered ops, per-row
# loss, gx, gy, dz_total against float64, outputs NaN-poisoned (an element never written fails).
# ---------------------------------------------------------------------------------------------


def _tile_reference(x, y, scale, bias, row_grad):
    """float64 (loss (N,), gx, gy, dz_total) of the kernel contract (fastcontrast/siglip.py)."""
    x, y, g = x.double().cpu(), y.double().cpu(), row_grad.double().cpu()
    labels = 2 * torch.eye(x.shape[0], y.shape[0], dtype=torch.float64) - 1
    t = -labels * (scale * (x @ y.T) + bias)
    dz = -g[:, None] * labels * torch.sigmoid(t)
    return torch.nn.functional.softplus(t, threshold=1e9).sum(1), dz @ y, dz.T @ x, dz.sum()


def _backend_runner(backend, configure):
    """(ops, extra kwargs) with tiles small enough that a 70-row problem spans several."""
    configure(poison_outputs=True)
    if backend == "torch":
        from fastcontrast import _siglip_torch

        configure(torch_chunk_elements=16 * 70)
        return _siglip_torch, {}, lambda s: s
    if backend == "cpu":
        from fastcontrast import _ext

        return _ext.load_extension(), dict(block_rows=16), float
    from fastcontrast.kernels import siglip

    return siglip, dict(blocks=(16, 16, 16)), lambda s: s


_TERMS = ("loss", "gx", "gy", "dz_total")


def _check_terms(backend, results, expected, wanted):
    """Each wanted term of results [(term, tensor)] against the float64 reference."""
    for name, got in results:
        ref = expected[_TERMS.index(name)]
        if not wanted[name]:
            continue
        assert got is not None and got.dtype == torch.float32, f"{backend} {name}: {got}"
        # gradients: relative to their magnitude, at least that of N terms of size 0.05
        n = expected[0].numel()
        scale = None if name == "loss" else max(1.0, float(ref.abs().max()), 0.05 * n)
        assert_close(got, ref, torch.float32, f"{backend} {name}", scale=scale)


@pytest.mark.parametrize("need", ["both", "gx", "gy", "neither"])
@pytest.mark.parametrize("d", [3, 40])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_backend_tiles(backend, d, need, configure):
    _skip_unsupported(backend, 70, d, torch.float32)
    ops, extra, as_scalar = _backend_runner(backend, configure)
    device = device_for(backend)
    x, y = [t.detach() for t in _features(70, d, torch.float32, device, norm=3.0)]
    scale, bias = (
        as_scalar(torch.tensor(4.0, device=device)),
        as_scalar(torch.tensor(-1.5, device=device)),
    )
    g = torch.linspace(-1, 2, 70, device=device)
    need_gx, need_gy = need in ("both", "gx"), need in ("both", "gy")
    wanted = dict(loss=True, gx=need_gx, gy=need_gy, dz_total=True)
    results = [("loss", ops.siglip_forward(x, y, scale, bias, **extra))]
    results += zip(
        _TERMS[1:],
        ops.siglip_backward(x, y, scale, bias, g, need_gx=need_gx, need_gy=need_gy, **extra),
    )
    if hasattr(ops, "siglip_forward_with_grad"):
        results += zip(
            _TERMS,
            ops.siglip_forward_with_grad(
                x, y, scale, bias, g, need_gx=need_gx, need_gy=need_gy, **extra
            ),
        )
    for name, got in results:  # the backends' own surface: None where not needed
        assert (got is not None) == wanted[name], f"{backend} {name}: {got}"
    _check_terms(backend, results, _tile_reference(x, y, 4.0, -1.5, g), wanted)


@pytest.mark.parametrize(
    "need",
    [(True, True), (True, False), (False, True), (False, False)],
    ids=["both", "gx", "gy", "neither"],
)
@pytest.mark.parametrize("n,d", [(1, 3), (37, 67), (130, 1000)], ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_registered_ops(backend, n, d, need, configure):
    """torch.ops.fastcontrast.siglip_forward / _backward / _forward_with_grad (the last where the
    backend fuses the gradient): outputs not needed are 0-element tensors, the others match."""
    _skip_unsupported(backend, n, d, torch.float32)
    if interpreting_triton(backend) and d > 100:
        pytest.skip("the Triton interpreter runs the small shapes")
    configure(poison_outputs=True)
    device = device_for(backend)
    x, y = [t.detach() for t in _features(n, d, torch.float32, device, norm=3.0)]
    scale, bias = torch.tensor(4.0, device=device), torch.tensor(-1.5, device=device)
    g = torch.linspace(-1, 2, n, device=device)
    ops = torch.ops.fastcontrast
    results = [("loss", ops.siglip_forward(x, y, scale, bias, backend))]
    results += zip(_TERMS[1:], ops.siglip_backward(x, y, scale, bias, g, *need, backend))
    if backends.PROPERTIES[backend].fuses_gradient:
        results += zip(_TERMS, ops.siglip_forward_with_grad(x, y, scale, bias, g, *need, backend))
    wanted = dict(loss=True, gx=need[0], gy=need[1], dz_total=True)
    for name, got in results:
        if not wanted[name]:
            assert got.shape == (0,), f"{name}: {tuple(got.shape)}, expected a 0-element tensor"
    _check_terms(backend, results, _tile_reference(x, y, 4.0, -1.5, g), wanted)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

_GOOD = dict(image=torch.randn(4, 3), text=torch.randn(4, 3), logit_scale=10.0, logit_bias=-10.0)
BAD_INPUTS = {
    "image_not_tensor": (dict(image=[[1.0]]), TypeError, "image must be a torch.Tensor"),
    "image_int": (
        dict(image=torch.ones(4, 3, dtype=torch.int64)),
        TypeError,
        "image must have a floating",
    ),
    "image_1d": (dict(image=torch.randn(4)), ValueError, "image must be 2-D"),
    "image_empty": (
        dict(image=torch.randn(0, 3), text=torch.randn(0, 3)),
        ValueError,
        "image must not be empty",
    ),
    "text_dtype": (
        dict(text=torch.randn(4, 3, dtype=torch.float64)),
        TypeError,
        "text must have the dtype of image",
    ),
    "text_rows": (
        dict(text=torch.randn(5, 3)),
        ValueError,
        "text must have the shape of image (4, 3)",
    ),
    "text_dim": (dict(text=torch.randn(4, 2)), ValueError, "text must have the shape of image"),
    "scale_vector": (
        dict(logit_scale=torch.ones(1)),
        ValueError,
        "logit_scale must be a float or a 0-dim tensor, got shape (1,)",
    ),
    "scale_int_tensor": (
        dict(logit_scale=torch.tensor(3)),
        TypeError,
        "logit_scale tensor must have a floating-point dtype",
    ),
    "scale_string": (
        dict(logit_scale="10"),
        TypeError,
        "logit_scale must be a float or a 0-dim tensor, got str",
    ),
    "scale_bool": (dict(logit_scale=True), TypeError, "logit_scale must be a float"),
    "scale_nan": (
        dict(logit_scale=float("nan")),
        ValueError,
        "logit_scale must be finite, got nan",
    ),
    "bias_inf": (
        dict(logit_bias=torch.tensor(float("-inf"))),
        ValueError,
        "logit_bias must be finite, got -inf",
    ),
    "bias_none": (
        dict(logit_bias=None),
        TypeError,
        "logit_bias must be a float or a 0-dim tensor, got NoneType",
    ),
    "reduction": (
        dict(reduction="avg"),
        ValueError,
        "reduction must be one of 'mean', 'sum', 'none', got 'avg'",
    ),
    "backend": (dict(backend="gpu"), ValueError, "backend must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(case):
    change, error, message = BAD_INPUTS[case]
    kwargs = {**_GOOD, **change}
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        siglip_loss(
            kwargs.pop("image"),
            kwargs.pop("text"),
            kwargs.pop("logit_scale"),
            kwargs.pop("logit_bias"),
            **kwargs,
        )


def test_triton_refuses_float64():
    if not backend_usable("triton", device_for("triton")):
        pytest.skip("triton unavailable here")
    image, text = _features(4, 3, torch.float64, device_for("triton"))
    with pytest.raises(TypeError, match="backend='triton' computes in float16/bfloat16/float32"):
        siglip_loss(image, text, 10.0, -10.0, backend="triton")


CPU_BAD = {
    "x_dtype": (dict(x=torch.randn(4, 3).half()), "x must have dtype float32 or float64, got Half"),
    "x_1d": (dict(x=torch.randn(4)), "x must be 2-D (N, D), got shape [4]"),
    "x_strided": (dict(x=torch.randn(3, 4).T), "x must be contiguous"),
    "y_dim": (
        dict(y=torch.randn(4, 2)),
        "y must have shape (M, D) with D = 3 (the feature dim of x), got [4, 2]",
    ),
    "y_dtype": (
        dict(y=torch.randn(4, 3, dtype=torch.float64)),
        "y must have dtype Float (the dtype of x), got Double",
    ),
    "scale": (dict(scale=float("inf")), "scale must be finite, got inf"),
    "row_grad_shape": (
        dict(row_grad=torch.ones(5)),
        "row_grad must have shape (4,) (one per row of x), got [5]",
    ),
    "row_grad_dtype": (
        dict(row_grad=torch.ones(4, dtype=torch.float64)),
        "row_grad must have dtype Float",
    ),
    "block_rows": (dict(block_rows=-1), "block_rows must be >= 0"),
}


@pytest.mark.parametrize("case", list(CPU_BAD))
def test_cpu_entry_point_checks(case):
    """The C++ entry points check their arguments (TORCH_CHECK names argument and values)."""
    if not backend_usable("cpu"):
        pytest.skip("C++ extension unavailable here")
    from fastcontrast import _ext

    module = _ext.load_extension()
    change, message = CPU_BAD[case]
    args = dict(
        x=torch.randn(4, 3),
        y=torch.randn(4, 3),
        scale=2.0,
        bias=-1.0,
        row_grad=torch.ones(4),
        block_rows=0,
        **{},
    )
    args.update(change)
    with pytest.raises(
        RuntimeError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        module.siglip_backward(
            args["x"],
            args["y"],
            args["scale"],
            args["bias"],
            args["row_grad"],
            block_rows=args["block_rows"],
        )


def test_triton_host_checks():
    if not backend_usable("triton", device_for("triton")):
        pytest.skip("triton unavailable here")
    from fastcontrast.kernels import siglip

    device = device_for("triton")
    x, y = torch.randn(4, 3, device=device), torch.randn(4, 3, device=device)
    s, b = torch.tensor(2.0, device=device), torch.tensor(-1.0, device=device)
    with pytest.raises(TypeError, match="x must have dtype in"):
        siglip.siglip_forward(x.double(), y.double(), s, b)
    with pytest.raises(ValueError, match=r"y must have D = 3 columns like x, got shape \(4, 2\)"):
        siglip.siglip_forward(x, y[:, :2].contiguous(), s, b)
    with pytest.raises(ValueError, match=r"row_grad must be a float32 tensor of shape \(4,\)"):
        siglip.siglip_backward(x, y, s, b, torch.ones(5, device=device))
    with pytest.raises(ValueError, match="blocks must be three powers of two"):
        siglip.siglip_forward(x, y, s, b, blocks=(16, 24, 16))
