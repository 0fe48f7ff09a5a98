"""Similarity distillation, distill_info_nce (fastcontrast/distill.py): every backend against the
float64 reference (values, gradients of the student's features and temperature, dtypes, odd
shapes, a teacher of another feature dim, tiny temperatures), equal to OpenCLIP's
DistillClipLoss distillation term and to CLIP-KD's KL plus the teacher entropy, the teacher
without gradient, the kernels' multi-block paths, argument errors, the module twin."""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc

from .._helpers import (FUSED_BACKENDS, as_float64, assert_close,
                        assert_compiles_with_changing_batch_sizes, device_for)
from .test_label_smoothing import BACKENDS, DTYPES, _rand, _skip, _skip_unchecked

# name -> (N, M offset, teacher dim (None: D), options)
CASES = {
    "symmetric": (0, None, dict(temperature=0.2, teacher_temperature=0.1)),
    "rows": (5, None, dict(temperature=0.2, teacher_temperature=0.3, symmetric=False)),
    "teacher_dim": (0, 9, dict(temperature=0.25, teacher_temperature=0.05)),
    "clip_scales": (0, None, dict(temperature=1 / 20, teacher_temperature=1 / 30,
                                  normalize=False)),
    "tiny_temperature": (0, None, dict(temperature=0.01, teacher_temperature=0.02)),
}


def _inputs(case, n, d, dtype, device):
    extra, teacher_dim, options = CASES[case]
    m, dt = n + extra, teacher_dim or d
    scale = 0.4 if case == "clip_scales" else 1.0  # unnormalised rows: moderate logits
    t = dict(student_query=_rand(n, d, dtype=dtype, device=device, scale=scale),
             student_key=_rand(m, d, dtype=dtype, device=device, scale=scale),
             teacher_query=_rand(n, dt, dtype=dtype, device=device, scale=scale),
             teacher_key=_rand(m, dt, dtype=dtype, device=device, scale=scale))
    for name in ("teacher_query", "teacher_key"):
        t[name] = t[name].detach()
    t["temperature"] = torch.tensor(options["temperature"], dtype=torch.float64,
                                    device=device).requires_grad_(True)
    return t, {k: v for k, v in options.items() if k != "temperature"}


def _value_and_grads(inputs, options, backend, reduction):
    leaves = {k: v for k, v in inputs.items() if v.requires_grad}
    loss = fc.distill_info_nce(**inputs, **options, reduction=reduction, backend=backend)
    weight = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype, device=loss.device)
    total = (loss * weight).sum() if loss.dim() else loss
    return loss, dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))


def _max_logit(inputs, options):
    scale = 1 / min(options["teacher_temperature"], float(inputs["temperature"].detach()))
    if options.get("normalize", True):
        return scale
    return scale * max(float(t.detach().norm(dim=-1).max()) ** 2
                       for k, t in inputs.items() if k != "temperature")


@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n,d", [(1, 3), (10, 16), (257, 3)], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_every_backend_matches_the_float64_reference(backend, case, n, d, dtype, reduction):
    _skip_unchecked(backend, dtype, n, reduction)
    inputs, options = _inputs(case, n, d, dtype, device_for(backend))
    loss, grads = _value_and_grads(inputs, options, backend, reduction)
    as64 = {k: as_float64(v)[0].cpu() for k, v in inputs.items()}
    ref, ref_grads = _value_and_grads(as64, options, "reference", reduction)
    lowp = {k: v.detach().cpu().requires_grad_(v.requires_grad) for k, v in inputs.items()}
    base, base_grads = _value_and_grads(lowp, options, "reference", reduction)
    assert loss.dtype == dtype
    max_logit = _max_logit(as64, options)
    assert_close(loss, ref, dtype, f"{backend}/{case} loss", max_logit=max_logit, baseline=base)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], dtype, f"{backend}/{case} d{name}",
                     max_logit=max_logit, baseline=base_grads[name])


def _open_clip_distill_term(image, text, logit_scale, dist_image, dist_text, dist_logit_scale):
    """OpenCLIP's DistillClipLoss (open_clip/loss.py) distillation term, single process,
    written out: dist_loss(teacher, student) = -(teacher.softmax(1) *
    student.log_softmax(1)).sum(1).mean(0), averaged over the two directions."""
    def dist_loss(teacher_logits, student_logits):
        return -(teacher_logits.softmax(dim=1)
                 * student_logits.log_softmax(dim=1)).sum(dim=1).mean(dim=0)

    logits_per_image = logit_scale * image @ text.T
    dist_logits_per_image = dist_logit_scale * dist_image @ dist_text.T
    return (dist_loss(dist_logits_per_image, logits_per_image)
            + dist_loss(dist_logits_per_image.T, logits_per_image.T)) / 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_open_clip_distill_clip_loss(backend):
    """CLIP features (unit rows from the model), logit scales as tensors: temperature =
    1 / logit_scale, normalize=False; value and the gradients of the student's features and
    logit scale equal OpenCLIP's."""
    _skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = device_for(backend)
    image, text = (F.normalize(torch.randn(12, 8, dtype=dtype, device=device), dim=-1)
                   .requires_grad_(True) for _ in range(2))
    dist_image, dist_text = (F.normalize(torch.randn(12, 16, dtype=dtype, device=device), dim=-1)
                             for _ in range(2))
    scale = torch.tensor(30.0, dtype=dtype, device=device, requires_grad=True)
    dist_scale = torch.tensor(50.0, dtype=dtype, device=device)
    expected = _open_clip_distill_term(image, text, scale, dist_image, dist_text, dist_scale)
    expected_grads = torch.autograd.grad(expected, [image, text, scale])
    loss = fc.distill_info_nce(image, text, dist_image, dist_text, temperature=1 / scale,
                               teacher_temperature=1 / dist_scale, normalize=False,
                               backend=backend)
    grads = torch.autograd.grad(loss, [image, text, scale])
    assert_close(loss, expected, dtype, "loss", max_logit=50.0)
    for name, grad, ref in zip(("image", "text", "logit_scale"), grads, expected_grads):
        assert_close(grad, ref, dtype, f"d {name}", max_logit=50.0)


def test_is_the_kl_of_clip_kd_plus_the_teacher_entropy():
    sq, sk, tq, tk = (F.normalize(torch.randn(9, 5, dtype=torch.float64), dim=-1)
                      for _ in range(4))
    loss = fc.distill_info_nce(sq, sk, tq, tk, temperature=0.2, teacher_temperature=0.1,
                               symmetric=False, reduction="none", backend="torch")
    log_p_t = (tq @ tk.T / 0.1).log_softmax(1)
    log_p_s = (sq @ sk.T / 0.2).log_softmax(1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="none").sum(1)
    entropy = -(log_p_t.exp() * log_p_t).sum(1)
    assert_close(loss, kl + entropy, torch.float64, "loss")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_the_teacher_gets_no_gradient(backend):
    _skip(backend)
    device = device_for(backend)
    sq, sk, tq, tk = (torch.randn(6, 4, device=device, requires_grad=True) for _ in range(4))
    teacher_tau = torch.tensor(0.1, device=device, requires_grad=True)
    fc.distill_info_nce(sq, sk, tq, tk, temperature=0.2, teacher_temperature=teacher_tau,
                        backend=backend).backward()
    assert sq.grad is not None and sk.grad is not None
    assert tq.grad is None and tk.grad is None and teacher_tau.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_teacher_equal_to_the_student_gives_zero_gradient(backend):
    """p^T = P^S: every G_ij = 0; the loss is the student's entropy."""
    _skip(backend)
    device = device_for(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    sq, sk = (torch.randn(7, 5, dtype=dtype, device=device, requires_grad=True)
              for _ in range(2))
    loss = fc.distill_info_nce(sq, sk, sq.detach(), sk.detach(), temperature=0.3,
                               teacher_temperature=0.3, backend=backend)
    for grad in torch.autograd.grad(loss, [sq, sk]):
        assert_close(grad, torch.zeros_like(grad), dtype, "grad", max_logit=4.0)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("case", ["symmetric", "rows", "teacher_dim", "clip_scales"])
def test_gradcheck_float64(backend, case):
    _skip(backend)
    inputs, options = _inputs(case, 5, 3, torch.float64, "cpu")
    leaves = [k for k, v in inputs.items() if v.requires_grad]

    def fn(*tensors):
        return fc.distill_info_nce(**{**inputs, **dict(zip(leaves, tensors))}, **options,
                                   backend=backend)

    assert torch.autograd.gradcheck(fn, [inputs[k] for k in leaves])


def test_the_kernels_agree_across_row_blocks(configure):
    """Column statistics merged over many row blocks (C++ block_rows, torch chunk sizes) equal
    the one-block result, forward and backward."""
    from fastcontrast import _distill_torch

    gen = torch.Generator().manual_seed(3)
    sq, sk = torch.randn(53, 6, generator=gen), torch.randn(53, 6, generator=gen)
    tq, tk = torch.randn(53, 4, generator=gen), torch.randn(53, 4, generator=gen)
    g, c = torch.rand(53, generator=gen), torch.rand(53, generator=gen)
    scales = (torch.tensor(3.0), torch.tensor(7.0))
    rows, cols = _distill_torch.distill_forward(sq, sk, tq, tk, *scales, with_cols=True)
    grads = _distill_torch.distill_backward(sq, sk, tq, tk, *scales, rows, g, cols, c)
    configure(torch_chunk_elements=53 * 2 * 4)  # chunks of 4 rows
    chunked = _distill_torch.distill_forward(sq, sk, tq, tk, *scales, with_cols=True)
    outputs = [("torch", chunked, _distill_torch.distill_backward(sq, sk, tq, tk, *scales, rows,
                                                                   g, cols, c))]
    if "cpu" in fc.available_backends():
        from fastcontrast import _ext

        ext = _ext.load_extension()
        blocked = ext.distill_forward(sq, sk, tq, tk, 3.0, 7.0, with_cols=True, block_rows=5)
        outputs.append(("cpu", blocked, ext.distill_backward(sq, sk, tq, tk, 3.0, 7.0, rows, g,
                                                             cols, c, block_rows=5)))
        fused = ext.distill_forward_with_grad(sq, sk, tq, tk, 3.0, 7.0, g, block_rows=5)
        row_grads = _distill_torch.distill_backward(sq, sk, tq, tk, *scales, rows, g)
        for got, want, what in zip(fused, (rows, *row_grads), ("rows", "gq", "gk")):
            assert_close(got, want, torch.float32, f"fused {what}", max_logit=10.0)
    for name, stats, gradients in outputs:
        for got, want, what in zip((*stats, *gradients), (rows, cols, *grads),
                                   ("rows", "cols", "gq", "gk")):
            assert_close(got, want, torch.float32, f"{name} {what}", max_logit=10.0)


_Q = torch.randn(4, 3)


@pytest.mark.parametrize("args, kwargs, match", [
    ((_Q, torch.randn(4, 2), _Q, _Q), {}, "student_key must have feature dimension 3"),
    ((_Q, _Q, _Q, torch.randn(4, 2)), {}, "teacher_key must have feature dimension 3"),
    ((_Q, _Q, torch.randn(3, 3), _Q), {}, "teacher_query must have N = 4 rows"),
    ((_Q, torch.randn(5, 3), _Q, torch.randn(4, 3)), dict(symmetric=False),
     "teacher_key must have M = 5 rows"),
    ((_Q, torch.randn(5, 3), _Q, torch.randn(5, 3)), {}, "symmetric=True needs"),
    ((_Q, _Q, _Q.double(), _Q), {}, "teacher_query must have the dtype of student_query"),
    ((_Q, _Q, _Q, _Q), dict(temperature=0.0), "temperature"),
    ((_Q, _Q, _Q, _Q), dict(teacher_temperature=-1.0), "teacher_temperature"),
    ((_Q, _Q, _Q, _Q), dict(reduction="avg"), "reduction must be one of"),
    ((_Q, _Q, _Q, _Q), dict(symmetric=1), "symmetric must be a bool"),
    ((_Q[0], _Q, _Q, _Q), {}, "student_query must be 2-D"),
])
def test_bad_arguments_are_refused(args, kwargs, match):
    options = {**dict(temperature=0.1, teacher_temperature=0.1), **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        fc.distill_info_nce(*args, **options)


def test_module_twin():
    sq, sk, tq, tk = torch.randn(4, 6, 5)
    module = fc.DistillInfoNCELoss(0.2, 0.1, symmetric=False)
    assert torch.equal(module(sq, sk, tq, tk),
                       fc.distill_info_nce(sq, sk, tq, tk, temperature=0.2,
                                           teacher_temperature=0.1, symmetric=False))
    assert "teacher_temperature=0.1" in repr(module)
    learnable = fc.DistillInfoNCELoss(0.2, 0.1, learn_temperature=True)
    learnable(sq.requires_grad_(), sk, tq, tk).backward()
    assert learnable.log_inverse_temperature.grad is not None
    with pytest.raises(ValueError, match="teacher_temperature must be a positive"):
        fc.DistillInfoNCELoss(0.2, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiles_with_changing_batch_sizes(backend):
    _skip(backend)

    def step(sq, sk, tq, tk):
        return fc.distill_info_nce(sq, sk, tq, tk, temperature=0.2, teacher_temperature=0.1,
                                   backend=backend)

    assert_compiles_with_changing_batch_sizes(step, 4)
