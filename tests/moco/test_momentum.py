"""momentum_update against a float64 reference loop: every backend that can run here (the C++
kernel, the Triton kernel in the interpreter on small CPU tensors, CUDA where a GPU is present),
every supported dtype pair, odd sizes, the exact ends m = 0 and m = 1, modules with buffers, and
bad input."""
import copy

import pytest
import torch
from torch import nn

import fastcontrast.momentum as fm
from fastcontrast import _ext

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


BACKENDS = fm.available_backends(DEVICE)
# Odd sizes: a single element, D = 3, 257, a 2-D and a 3-D shape, an empty tensor, and one
# tensor large enough to be split across threads (C++) and across several programs (Triton).
SHAPES = [(1,), (3,), (257,), (1000, 3), (5, 7, 3), (0, 4), (70001,)]
PAIRS = sorted(fm.SUPPORTED_DTYPE_PAIRS, key=str)


def _tensors(shapes, dtype, scale=1.0):
    return [(torch.randn(s, dtype=torch.float64) * scale).to(dtype=dtype, device=DEVICE)
            for s in shapes]


def reference(targets, onlines, m):
    """m * target + (1 - m) * online in float64, per tensor."""
    return [m * t.double() + (1 - m) * o.double() for t, o in zip(targets, onlines)]


def assert_ema_close(actual, expected, targets, onlines, name):
    """Within the rounding of the target dtype (half an ulp of the result) plus the float32 (or
    float64) compute error, a few ulps of the inputs' magnitude."""
    for i, (a, e, t, o) in enumerate(zip(actual, expected, targets, onlines)):
        compute = torch.float64 if a.dtype == torch.float64 else torch.float32
        magnitude = t.double().abs().cpu() + o.double().abs().cpu()
        bound = (0.5 * torch.finfo(a.dtype).eps * e.abs().cpu()
                 + 4 * torch.finfo(compute).eps * magnitude + torch.finfo(a.dtype).tiny)
        err = (a.double().cpu() - e.cpu()).abs()
        bad = err > bound
        assert not bad.any(), (f"{name}: tensor {i} {tuple(a.shape)} {a.dtype}: {int(bad.sum())} "
                               f"elements off, max err {float(err.max()):.3e}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}<-{p[1]}".replace("torch.", ""))
@pytest.mark.parametrize("m", [0.999, 0.3, 0.5])
def test_matches_float64_reference(backend, pair, m):
    target_dtype, online_dtype = pair
    targets, onlines = _tensors(SHAPES, target_dtype), _tensors(SHAPES, online_dtype)
    expected = reference(targets, onlines, m)
    before = [t.clone() for t in targets]
    fm.momentum_update(targets, onlines, m, backend=backend)
    assert_ema_close(targets, expected, before, onlines, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e30), (torch.float32, 1e-30),
                                         (torch.float16, 1e4), (torch.bfloat16, 1e30),
                                         (torch.float64, 1e200)])
def test_large_and_tiny_magnitudes(backend, dtype, scale):
    targets, onlines = _tensors(SHAPES[:5], dtype, scale), _tensors(SHAPES[:5], dtype, scale)
    expected = reference(targets, onlines, 0.99)
    before = [t.clone() for t in targets]
    fm.momentum_update(targets, onlines, 0.99, backend=backend)
    assert all(torch.isfinite(t).all() for t in targets)
    assert_ema_close(targets, expected, before, onlines, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}<-{p[1]}".replace("torch.", ""))
def test_exact_at_m_one_and_m_zero(backend, pair):
    target_dtype, online_dtype = pair
    targets, onlines = _tensors(SHAPES, target_dtype), _tensors(SHAPES, online_dtype)
    before = [t.clone() for t in targets]
    fm.momentum_update(targets, onlines, 1.0, backend=backend)
    assert all(torch.equal(t, b) for t, b in zip(targets, before))
    fm.momentum_update(targets, onlines, 0.0, backend=backend)
    assert all(torch.equal(t, o.to(target_dtype)) for t, o in zip(targets, onlines))


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_groups_and_non_contiguous_pairs_in_one_call(backend):
    targets = _tensors([(3, 5), (4,), (6, 2)], torch.float32)
    targets += _tensors([(7,)], torch.float64) + _tensors([(2, 3)], torch.bfloat16)
    onlines = _tensors([(3, 5)], torch.float16) + _tensors([(4,), (6, 2)], torch.float32)
    onlines += _tensors([(7,)], torch.float64) + _tensors([(2, 3)], torch.bfloat16)
    # Strided views: the fused kernels take only contiguous pairs, these go through torch.
    base_t, base_o = _tensors([(5, 8)], torch.float32)[0], _tensors([(5, 8)], torch.float32)[0]
    targets.append(base_t.t()[::2])
    onlines.append(base_o.t()[1::2])
    untouched = base_t.t()[1::2].clone()
    expected = reference(targets, onlines, 0.9)
    before = [t.clone() for t in targets]
    fm.momentum_update(targets, onlines, 0.9, backend=backend)
    assert_ema_close(targets, expected, before, onlines, backend)
    assert torch.equal(base_t.t()[1::2], untouched)  # the rows between the view's rows


def _counting_launches(monkeypatch):
    """[(target dtype, online dtype, tensors, backend)] of every momentum_lerp_ op call."""
    calls = []
    real = fm.momentum_lerp_

    def counting(targets, onlines, weight, backend):
        calls.append((targets[0].dtype, onlines[0].dtype, len(targets), backend))
        real(targets, onlines, weight, backend)

    monkeypatch.setattr(fm, "momentum_lerp_", counting)
    return calls


def test_one_launch_per_dtype_group(monkeypatch):
    calls = _counting_launches(monkeypatch)
    targets = _tensors([(3,), (4,), (5,)], torch.float32) + _tensors([(2,)], torch.float64)
    onlines = _tensors([(3,)], torch.float32) + _tensors([(4,), (5,)], torch.bfloat16)
    onlines += _tensors([(2,)], torch.float64)
    expected = reference(targets, onlines, 0.5)
    before = [t.clone() for t in targets]
    fm.momentum_update(targets, onlines, 0.5, backend="torch")
    assert sorted(calls, key=str) == sorted(
        [(torch.float32, torch.float32, 1, "torch"), (torch.float32, torch.bfloat16, 2, "torch"),
         (torch.float64, torch.float64, 1, "torch")], key=str)
    assert_ema_close(targets, expected, before, onlines, "grouped")


def _net():
    return nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.Flatten(),
                         nn.Linear(5 * 4 * 4, 7)).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("include_buffers", [False, True])
def test_modules_matched_by_name_with_buffers(backend, include_buffers):
    online = _net()
    online(torch.randn(4, 3, 6, 6, device=DEVICE))  # BatchNorm statistics move, counter = 1
    target = _net()
    t_before = copy.deepcopy(target.state_dict())
    o_state = online.state_dict()
    fm.momentum_update(target, online, 0.9, include_buffers=include_buffers, backend=backend)
    for name, value in target.state_dict().items():
        averaged = name in dict(target.named_parameters()) or (
            include_buffers and value.is_floating_point())
        if averaged:
            expected = 0.9 * t_before[name].double() + 0.1 * o_state[name].double()
            assert torch.allclose(value.double(), expected, rtol=1e-6, atol=1e-7), name
        elif include_buffers:  # num_batches_tracked: copied
            assert torch.equal(value, o_state[name]), name
        else:
            assert torch.equal(value, t_before[name]), name
    assert all(p.grad_fn is None and p.requires_grad for p in target.parameters())


def test_online_parameters_requiring_grad_are_not_recorded():
    online, target = _net(), _net()
    with torch.enable_grad():
        fm.momentum_update(target, online, 0.5)
    loss = sum(p.sum() for p in target.parameters())
    loss.backward()
    assert all(p.grad is None for p in online.parameters())


def test_momentum_as_a_tensor():
    targets, onlines = _tensors([(4,)], torch.float32), _tensors([(4,)], torch.float32)
    expected = reference(targets, onlines, 0.75)
    before = [t.clone() for t in targets]
    fm.momentum_update(targets, onlines, torch.tensor(0.75))
    assert_ema_close(targets, expected, before, onlines, "tensor m")


@pytest.mark.skipif(not _ext.available(), reason="C++ extension unavailable: auto takes torch "
                    "(test_cpu_extension.py::test_disabled_extension_falls_back_with_one_warning)")
def test_auto_takes_the_cpu_kernel_on_cpu(monkeypatch):
    """Documented: CPU tensors with the C++ extension built -> "cpu" (measured faster)."""
    assert fm.resolve_backend("auto", "cpu") == "cpu"
    calls = _counting_launches(monkeypatch)
    targets, onlines = _tensors([(6,)], torch.float32), _tensors([(6,)], torch.float32)
    targets = [t.cpu() for t in targets]
    onlines = [o.cpu() for o in onlines]
    expected = reference(targets, onlines, 0.9)
    before = [t.clone() for t in targets]
    fm.momentum_update(targets, onlines, 0.9)
    assert [c[3] for c in calls] == ["cpu"]
    assert_ema_close(targets, expected, before, onlines, "auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_auto_takes_triton_on_cuda():
    """Documented: CUDA tensors -> "triton" when triton imports, else "torch"."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed")
    assert fm.resolve_backend("auto", "cuda") == "triton"


@pytest.mark.skipif(not _ext.available(), reason="C++ extension unavailable")
def test_cpu_kernel_checks_its_arguments():
    module = _ext.load_extension()
    with pytest.raises(RuntimeError, match=r"online must have the target's shape \[3\], got \[4\]"):
        module.momentum_update_([torch.zeros(3)], [torch.zeros(4)], 0.5)
    with pytest.raises(RuntimeError, match="unsupported .*Half, Float"):
        module.momentum_update_([torch.zeros(3, dtype=torch.half)], [torch.zeros(3)], 0.5)
    with pytest.raises(RuntimeError, match="weight .* must be in \\[0, 1\\], got 1.5"):
        module.momentum_update_([torch.zeros(3)], [torch.zeros(3)], 1.5)
    with pytest.raises(RuntimeError, match="same length, got 1 and 0"):
        module.momentum_update_([torch.zeros(3)], [], 0.5)
    t = torch.zeros(4, 4)
    with pytest.raises(RuntimeError, match="online must have its strides"):
        module.momentum_update_([t], [torch.zeros(4, 4).t()], 0.5)


@pytest.mark.parametrize("call,error,match", [
    (lambda t, o: fm.momentum_update(t, o, 1.5), ValueError, r"m must be in \[0, 1\], got 1.5"),
    (lambda t, o: fm.momentum_update(t, o, -0.1), ValueError, r"m must be in \[0, 1\]"),
    (lambda t, o: fm.momentum_update(t, o, float("nan")), ValueError, r"m must be in \[0, 1\]"),
    (lambda t, o: fm.momentum_update(t, o, "0.9"), TypeError, "m must be a float in .* got str"),
    (lambda t, o: fm.momentum_update(t, o, True), TypeError, "got bool"),
    (lambda t, o: fm.momentum_update(t, o, torch.ones(2)), TypeError, "0-dim floating tensor"),
    (lambda t, o: fm.momentum_update(t, o[:1], 0.9), ValueError, "same length, got 2 and 1"),
    (lambda t, o: fm.momentum_update(t, [o[0], torch.zeros(5)], 0.9), ValueError,
     r"\[1\]: online must have the target's shape \(3,\), got \(5,\)"),
    (lambda t, o: fm.momentum_update(t, [o[0], 1.0], 0.9), TypeError,
     r"online\[1\] must be a torch.Tensor, got float"),
    (lambda t, o: fm.momentum_update([x.half() for x in t], o, 0.9), TypeError,
     r"\[0\]: unsupported \(target, online\) dtypes \(torch.float16, torch.float32\)"),
    (lambda t, o: fm.momentum_update([x.bfloat16() for x in t], [x.half() for x in o], 0.9),
     TypeError, r"unsupported \(target, online\) dtypes \(torch.bfloat16, torch.float16\)"),
    (lambda t, o: fm.momentum_update(t, [o[0], o[1].to("meta")], 0.9), ValueError,
     r"\[1\]: online must be on the target's device \(cpu\), got meta"),
    (lambda t, o: fm.momentum_update(t, o, 0.9, backend="fast"), ValueError,
     "backend must be one of 'auto', 'torch', 'cpu', 'triton', 'cuda', got 'fast'"),
    (lambda t, o: fm.momentum_update(t, o, 0.9, backend="cuda"), ValueError,
     "backend='cuda' needs CUDA tensors, got tensors on cpu"),
    (lambda t, o: fm.momentum_update(t[0], o[0], 0.9), TypeError,
     "must both be nn.Modules or both sequences of tensors, got Tensor and Tensor"),
    (lambda t, o: fm.momentum_update(nn.Linear(3, 3), o, 0.9), TypeError,
     "got Linear and list"),
    (lambda t, o: fm.momentum_update(t, o, 0.9, include_buffers=1), TypeError,
     "include_buffers must be a bool"),
    (lambda t, o: fm.momentum_update([torch.zeros(2, dtype=torch.int32)],
                                     [torch.zeros(2, dtype=torch.int64)], 0.9), TypeError,
     "integer/bool tensors are copied and need equal dtypes"),
])
def test_bad_input(call, error, match):
    targets = [torch.zeros(3), torch.zeros(3)]
    onlines = [torch.ones(3), torch.ones(3)]
    with pytest.raises(error, match=match):
        call(targets, onlines)
    assert all(not t.any() for t in targets)  # nothing was updated before the error


def test_module_name_mismatch_lists_the_names():
    target = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    online = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"only in target: \[1.bias, 1.weight\], only in online: "
                                         r"\[\]"):
        fm.momentum_update(target, online, 0.9)
    wide = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"0.weight: online must have the target's shape "
                                         r"\(3, 3\), got \(4, 3\)"):
        fm.momentum_update(nn.Sequential(nn.Linear(3, 3)), wide, 0.9)
    with pytest.raises(ValueError, match="same parameters and buffers by name; only in target: "
                                         r"\[1.num_batches_tracked"):
        fm.momentum_update(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)),
                           nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3)), 0.9,
                           include_buffers=True)


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton cannot run here")
def test_triton_metadata_cache_follows_the_tensors():
    from fastcontrast.kernels import momentum as kernels

    targets, onlines = _tensors([(5,), (33,)], torch.float32), _tensors([(5,), (33,)],
                                                                        torch.float32)
    for _ in range(2):  # the second call reuses the cached metadata
        expected = reference(targets, onlines, 0.8)
        before = [t.clone() for t in targets]
        kernels.lerp_multi_tensor_(targets, onlines, 0.2)
        assert_ema_close(targets, expected, before, onlines, "cached")
    fresh = [t.clone() for t in targets]  # new addresses: new metadata
    expected = reference(fresh, onlines, 0.8)
    before = [t.clone() for t in fresh]
    kernels.lerp_multi_tensor_(fresh, onlines, 0.2)
    assert_ema_close(fresh, expected, before, onlines, "fresh")
    with pytest.raises(ValueError, match="must be contiguous"):
        kernels.lerp_multi_tensor_([torch.zeros(4, 4).t()], [torch.zeros(4, 4).t()], 0.5)
