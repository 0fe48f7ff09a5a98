"""OpenCLIP's DistillClipLoss fused, distill_clip_loss (fastcontrast/distill_clip.py): both terms
on every backend against the float64 reference (values and the gradients of each term apart:
the student's features and logit scale), dtypes, odd shapes, a teacher of another feature dim,
large logit scales; equal to clip_loss and distill_info_nce called apart and to OpenCLIP's
formulas written out; the teacher without gradient; the kernels' separate student weights;
gradcheck; argument errors; the module twin."""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc

from .._helpers import FUSED_BACKENDS, as_float64, assert_close, device_for
from .test_distill import _open_clip_distill_term
from .test_label_smoothing import BACKENDS, DTYPES, _skip, _skip_unchecked

# name -> (teacher dim (None: D), logit_scale, teacher_logit_scale)
CASES = {
    "clip": (None, 10.0, 20.0),
    "teacher_dim": (7, 14.0, 30.0),
    "large_scales": (None, 100.0, 50.0),
}


def _unit(n, d, dtype, device, requires_grad):
    t = F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1)
    return t.to(dtype=dtype, device=device).requires_grad_(requires_grad)


def _inputs(case, n, d, dtype, device):
    teacher_dim, scale, teacher_scale = CASES[case]
    dt = teacher_dim or d
    return dict(student_image=_unit(n, d, dtype, device, True),
                student_text=_unit(n, d, dtype, device, True),
                teacher_image=_unit(n, dt, dtype, device, False),
                teacher_text=_unit(n, dt, dtype, device, False),
                logit_scale=torch.tensor(scale, dtype=torch.float64, device=device,
                                         requires_grad=True),
                teacher_logit_scale=teacher_scale)


def _weighted(term):
    """A weighted sum of a term's rows (the scalar itself when reduced): "none" checks
    per-row upstream weights."""
    if not term.dim():
        return term
    return (term * torch.linspace(-1, 2, term.numel(), dtype=term.dtype,
                                  device=term.device)).sum()


def _terms_and_grads(inputs, backend, reduction):
    """((contrastive, distill), (grads of the contrastive term, grads of the distillation term)),
    each gradient dict over the inputs that require grad."""
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    terms = fc.distill_clip_loss(**inputs, reduction=reduction, backend=backend)
    grads = []
    for i, term in enumerate(terms):
        grads.append(dict(zip(leaves, torch.autograd.grad(_weighted(term), list(leaves.values()),
                                                          retain_graph=i == 0))))
    return terms, grads


@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n,d", [(1, 3), (10, 16), (257, 3)], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_every_backend_matches_the_float64_reference(backend, case, n, d, dtype, reduction):
    _skip_unchecked(backend, dtype, n, reduction)
    inputs = _inputs(case, n, d, dtype, device_for(backend))
    terms, grads = _terms_and_grads(inputs, backend, reduction)
    as64 = {k: as_float64(v)[0].cpu() if isinstance(v, torch.Tensor) else v
            for k, v in inputs.items()}
    ref, ref_grads = _terms_and_grads(as64, "reference", reduction)
    lowp = {k: v.detach().cpu().requires_grad_(v.requires_grad)
            if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    base, base_grads = _terms_and_grads(lowp, "reference", reduction)
    max_logit = max(CASES[case][1:])
    for i, what in enumerate(("contrastive", "distill")):
        assert terms[i].dtype == dtype
        assert_close(terms[i], ref[i], dtype, f"{backend}/{case} {what}", max_logit=max_logit,
                     baseline=base[i])
        for name, grad in grads[i].items():
            assert_close(grad, ref_grads[i][name], dtype, f"{backend}/{case} {what} d{name}",
                         max_logit=max_logit, baseline=base_grads[i][name])


def _open_clip_terms(image, text, scale, dist_image, dist_text, dist_scale):
    """OpenCLIP's DistillClipLoss.forward (open_clip/loss.py), single process, written out (its
    distillation term: test_distill.py's)."""
    logits_per_image, logits_per_text = scale * image @ text.T, scale * text @ image.T
    labels = torch.arange(image.shape[0], device=image.device)
    contrastive = (F.cross_entropy(logits_per_image, labels)
                   + F.cross_entropy(logits_per_text, labels)) / 2
    return contrastive, _open_clip_distill_term(image, text, scale, dist_image, dist_text,
                                                dist_scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_open_clip_and_the_two_losses_apart(backend):
    """The terms equal OpenCLIP's written-out formulas and clip_loss, distill_info_nce called
    apart (values and gradients of contrastive + 0.3 distill)."""
    _skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    inputs = _inputs("teacher_dim", 12, 8, dtype, device_for(backend))
    x, y, tx, ty, scale, t_scale = inputs.values()
    leaves = [x, y, scale]
    ours = fc.distill_clip_loss(x, y, tx, ty, scale, t_scale, backend=backend)
    apart = (fc.clip_loss(x, y, scale, backend=backend),
             fc.distill_info_nce(x, y, tx, ty, temperature=1 / scale,
                                 teacher_temperature=1 / t_scale, normalize=False,
                                 backend=backend))
    written = _open_clip_terms(x, y, scale, tx, ty, t_scale)
    want = torch.autograd.grad(written[0] + 0.3 * written[1], leaves, retain_graph=True)
    for name, terms in (("ours", ours), ("apart", apart)):
        for got, ref, what in zip(terms, written, ("contrastive", "distill")):
            assert_close(got, ref, dtype, f"{name} {what}", max_logit=30.0)
        grads = torch.autograd.grad(terms[0] + 0.3 * terms[1], leaves)
        for got, ref, what in zip(grads, want, ("image", "text", "logit_scale")):
            assert_close(got, ref, dtype, f"{name} d{what}", max_logit=30.0)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_the_teacher_gets_no_gradient(backend):
    _skip(backend)
    device = device_for(backend)
    x, y, tx, ty = (torch.randn(6, 4, device=device, requires_grad=True) for _ in range(4))
    t_scale = torch.tensor(20.0, device=device, requires_grad=True)
    sum(fc.distill_clip_loss(x, y, tx, ty, 10.0, t_scale, backend=backend)).backward()
    assert x.grad is not None and y.grad is not None
    assert tx.grad is None and ty.grad is None and t_scale.grad is None


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradcheck_float64(backend, reduction):
    _skip(backend)
    inputs = _inputs("teacher_dim", 5, 3, torch.float64, "cpu")
    leaves = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        return fc.distill_clip_loss(**{**inputs, **dict(zip(leaves, tensors))},
                                    reduction=reduction, backend=backend)

    assert torch.autograd.gradcheck(fn, [inputs[k] for k in leaves])


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_the_kernels_take_separate_student_weights(backend):
    """distill_backward with student weights a, ca: G = a P^S - g p^T + ca Pc^S - c pc^T on
    the materialised matrices; without them (a = g) the distillation-only gradient."""
    from fastcontrast import backends

    _skip(backend)
    device = device_for(backend)
    gen = torch.Generator().manual_seed(5)
    sq, sk, tq, tk = (torch.randn(9, d, generator=gen).to(device) for d in (6, 6, 4, 4))
    g, c, a, ca = (torch.randn(9, generator=gen).to(device) for _ in range(4))
    s_scale, t_scale = torch.tensor(3.0, device=device), torch.tensor(5.0, device=device)
    ops = backends.kernels("distill", backend)
    if backend == "cpu":
        s_scale, t_scale = 3.0, 5.0
    rows, cols = ops.distill_forward(sq, sk, tq, tk, s_scale, t_scale, with_cols=True)
    s, t = 3.0 * sq @ sk.T, 5.0 * tq @ tk.T
    for student in (None, (a, ca)):
        ra, rc = (g, c) if student is None else student
        big = (ra[:, None] * s.softmax(1) - g[:, None] * t.softmax(1)
               + rc[None, :] * s.softmax(0) - c[None, :] * t.softmax(0))
        extra = {} if student is None else dict(row_student_grad=a, col_student_grad=ca)
        gq, gk = ops.distill_backward(sq, sk, tq, tk, s_scale, t_scale, rows, g, cols, c,
                                      **extra)
        assert_close(gq, big @ sk, torch.float32, "gq", max_logit=15.0)
        assert_close(gk, big.T @ sq, torch.float32, "gk", max_logit=15.0)
    if backend == "cpu":  # the fused forward of the row direction takes them too
        big = a[:, None] * s.softmax(1) - g[:, None] * t.softmax(1)
        _, gq, gk = ops.distill_forward_with_grad(sq, sk, tq, tk, 3.0, 5.0, g,
                                                  row_student_grad=a)
        assert_close(gq, big @ sk, torch.float32, "fused gq", max_logit=15.0)
        assert_close(gk, big.T @ sq, torch.float32, "fused gk", max_logit=15.0)


_X = torch.randn(4, 3)


@pytest.mark.parametrize("args, kwargs, match", [
    ((_X, torch.randn(4, 2), _X, _X), {}, "student_text must have the shape of student_image"),
    ((_X, _X, _X, torch.randn(4, 2)), {}, "teacher_text must have the shape of teacher_image"),
    ((_X, _X, torch.randn(3, 3), torch.randn(3, 3)), {}, "teacher_image must have N = 4 rows"),
    ((_X, _X, _X.double(), _X), {}, "teacher_image must have the dtype of student_image"),
    ((_X[0], _X, _X, _X), {}, "student_image must be 2-D"),
    ((_X, _X, _X, _X.long()), {}, "teacher_text must have a floating-point dtype"),
    ((_X, _X, _X, _X), dict(logit_scale=0.0), "logit_scale"),
    ((_X, _X, _X, _X), dict(teacher_logit_scale=-1.0), "teacher_logit_scale"),
    ((_X, _X, _X, _X), dict(reduction="avg"), "reduction must be one of"),
])
def test_bad_arguments_are_refused(args, kwargs, match):
    options = {**dict(logit_scale=10.0, teacher_logit_scale=20.0), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        fc.distill_clip_loss(*args, **options)


def test_module_twin():
    x, y, tx, ty = torch.randn(4, 6, 5)
    module = fc.DistillClipLoss(reduction="sum", backend="torch")
    got = module(x, y, tx, ty, 10.0, 20.0)
    want = fc.distill_clip_loss(x, y, tx, ty, 10.0, 20.0, reduction="sum", backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert "reduction='sum'" in repr(module)
