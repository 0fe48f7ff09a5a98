"""The registry of the public losses that the loss tests share: for each loss, the shapes of its
feature inputs, its default scalars (temperature, or logit_scale and logit_bias), how to call it
on a backend (``run``; backend="reference" on float64 copies is its float64 truth,
``reference``) and its nn.Module twin. The family contract (tests/losses/contract/) runs every
property over this registry; the per-loss files (tests/losses/test_<loss>.py) use it too.

A new public loss goes here first: contract/test_registry.py fails until it does."""
import math
from typing import Callable, NamedTuple

import pytest
import torch

import fastcontrast
from fastcontrast import NegativeQueue

from .._helpers import as_float64, assert_close, backend_usable, device_for, interpreting_triton

ALL_BACKENDS = tuple(b for b in ("reference", "torch", "cpu", "triton")
                     if backend_usable(b, device_for(b)))
FLOAT64_BACKENDS = tuple(b for b in ALL_BACKENDS if b != "triton")  # triton refuses float64
REDUCTIONS = ("mean", "sum", "none")
# (rtol, atol) of a loss or gradient against the float64 reference on the very same values.
CLOSE = {torch.float64: (1e-9, 1e-10), torch.float32: (2e-5, 2e-5)}


def float_backends(dtype):
    return [b for b in ALL_BACKENDS if dtype != torch.float64 or b != "triton"]


def dtype_for(backend):
    """The widest dtype the backend takes: float64, float32 for triton."""
    return torch.float32 if backend == "triton" else torch.float64


def leaf(*shape, dtype, device, scale=1.0):
    t = torch.randn(*shape, dtype=torch.float64) * scale
    return t.to(dtype=dtype, device=device).requires_grad_(True)


def copies(tensors, dtype=torch.float64):
    """Fresh leaves with the values of ``tensors`` in ``dtype`` (requires_grad kept)."""
    return [t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]


def grads(tensors):
    return [t.grad for t in tensors if t.requires_grad]


def assert_same(actual, expected, dtype, name):
    """Closeness at the tolerance of ``dtype`` with NaN and +-inf in exactly the same places."""
    assert actual is not None, f"{name}: no gradient"
    rtol, atol = CLOSE[dtype]
    scale = expected.detach()[torch.isfinite(expected.detach())].abs().max() if (
        torch.isfinite(expected).any()) else torch.tensor(1.0)
    torch.testing.assert_close(actual.detach().to(torch.float64).cpu(),
                               expected.detach().to(torch.float64).cpu(), rtol=rtol,
                               atol=atol * max(1.0, float(scale)), equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def queue_of(keys, indices):
    """A NegativeQueue (stored indices) holding ``keys`` with the instance ids ``indices``."""
    queue = NegativeQueue(8, keys.shape[1], dtype=keys.dtype, device=keys.device,
                          store_indices=True)
    queue.enqueue(keys.detach(), indices=indices)
    return queue


# ---------------------------------------------------------------------------------------------
# The public losses on fresh inputs: feature shapes for (n, d), default scalars, the call.


def _labels(n, device):
    return torch.arange(n, device=device) % 2


def _teacher(like, seed):
    """Fixed teacher features of ``like``'s shape, dtype and device, independent of its values
    (a gradcheck's perturbations leave the teacher as it is)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(like.shape, generator=gen, dtype=torch.float64).to(like.dtype).to(
        like.device)


def _distill(f, s, **kw):
    """distill_info_nce of the student features f against a fixed teacher (no teacher leaf:
    the family's checks see the student's gradients only)."""
    return fastcontrast.distill_info_nce(f[0], f[1], _teacher(f[0], 1), _teacher(f[1], 2),
                                         temperature=s[0], teacher_temperature=0.1, **kw)


def _distill_clip(f, s, **kw):
    """distill_clip_loss of the student features f against a fixed teacher: the sum of its two
    terms (the family's checks take one loss; each term apart: tests/objectives/
    test_distill_clip.py)."""
    contrastive, distill = fastcontrast.distill_clip_loss(
        f[0], f[1], _teacher(f[0], 1), _teacher(f[1], 2), s[0], 10.0, **kw)
    return contrastive + distill


class Case(NamedTuple):
    shapes: Callable  # (n, d) -> the feature shapes
    scalars: tuple  # temperature / logit_scale (and logit_bias)
    call: Callable  # call(features, scalars, **options) -> loss
    module: type  # the nn.Module twin


CASES = {
    "info_nce": Case(lambda n, d: [(n, d), (n, d)], (0.2,),
                     lambda f, s, **kw: fastcontrast.info_nce(*f, temperature=s[0], **kw),
                     fastcontrast.InfoNCELoss),
    "clip_loss": Case(lambda n, d: [(n, d), (n, d)], (5.0,),
                      lambda f, s, **kw: fastcontrast.clip_loss(*f, s[0], **kw),
                      fastcontrast.ClipLoss),
    "nt_xent": Case(lambda n, d: [(n, d), (n, d)], (0.5,),
                    lambda f, s, **kw: fastcontrast.nt_xent(*f, temperature=s[0], **kw),
                    fastcontrast.NTXentLoss),
    "supcon": Case(lambda n, d: [(n, d)], (0.3,),
                   lambda f, s, **kw: fastcontrast.supcon(
                       f[0], _labels(f[0].shape[0], f[0].device), temperature=s[0], **kw),
                   fastcontrast.SupConLoss),
    "moco_loss": Case(lambda n, d: [(n, d), (n, d), (5, d)], (0.2,),
                      lambda f, s, **kw: fastcontrast.moco_loss(*f, temperature=s[0], **kw),
                      fastcontrast.MoCoLoss),
    "siglip_loss": Case(lambda n, d: [(n, d), (n, d)], (3.0, -2.0),
                        lambda f, s, **kw: fastcontrast.siglip_loss(*f, *s, **kw),
                        fastcontrast.SigLIPLoss),
    "distill_info_nce": Case(lambda n, d: [(n, d), (n, d)], (0.2,), _distill,
                             fastcontrast.DistillInfoNCELoss),
    "distill_clip_loss": Case(lambda n, d: [(n, d), (n, d)], (5.0,), _distill_clip,
                              fastcontrast.DistillClipLoss),
}


def run(name, features, backend, scalars=None, **options):
    """The loss ``name`` of ``features`` on ``backend`` (its default scalars unless given)."""
    case = CASES[name]
    return case.call(features, case.scalars if scalars is None else scalars, backend=backend,
                     **options)


def reference(name, features, scalars=None, **options):
    """The float64 truth of run(name, features, ...): backend="reference" on float64 copies."""
    return run(name, copies(features), "reference", scalars=scalars, **options)


def inputs(name, n, d, dtype, device):
    """Fresh leaves (requiring grad) of the loss's feature shapes for (n, d)."""
    return [leaf(*shape, dtype=dtype, device=device) for shape in CASES[name].shapes(n, d)]


def log_parameter_grad(loss_of_scale, value):
    """d loss / d log(value) through float64 autograd."""
    log_value = torch.tensor(math.log(value), dtype=torch.float64, requires_grad=True)
    loss_of_scale(log_value.exp()).backward()
    return log_value.grad


# The inputs of the bad-input tables.
N, D = 6, 4


def q_k(n=N, m=N, d=D, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)


def raises_clear_error(bad_call):
    """bad_call = (call, error type, pattern of its message)."""
    call, error, pattern = bad_call
    with pytest.raises(error, match=pattern):
        call()


def skip_unavailable(backend):
    if not backend_usable(backend):
        pytest.skip(f"backend {backend!r} unavailable here")


def require_every_loss(names, what, exempt=()):
    """Fails the import of a contract file whose table (keyed by loss, or by variants named
    <loss>_<variant>) leaves out a registered loss other than those ``exempt`` (each with its
    reason where it is exempted)."""
    covered = {loss for loss in CASES for name in names
               if name == loss or name.startswith(loss + "_")}
    missing = set(CASES) - covered - set(exempt)
    assert not missing, f"{what} misses the registered losses {sorted(missing)}"


# ---------------------------------------------------------------------------------------------
# A fused backend against the float64 reference: values and gradients


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


# The objectives of nt_xent (and info_nce): SimCLR, DCL, DCLW, HCL.
OBJECTIVES = {
    "plain": dict(),
    "dcl": dict(decoupled=True),
    "dclw": dict(decoupled=True, dclw_sigma=0.5),
    "hcl": dict(hcl_beta=1.0, hcl_tau_plus=0.1),
    "hcl_debias_only_decoupled": dict(hcl_beta=0.0, hcl_tau_plus=0.05, decoupled=True),
}


def skip_unsupported(backend, dtype, size):
    if not backend_usable(backend, device_for(backend)):
        pytest.skip(f"backend {backend!r} unavailable here")
    if backend == "triton":
        if dtype == torch.float64:
            pytest.skip("triton kernels do not take float64")
        if interpreting_triton(backend) and (
            size > 64 * 64 or dtype == torch.bfloat16 and size > 8 * 64
        ):
            pytest.skip("the Triton interpreter runs only small shapes")


def check_against_reference(backend, dtype, fused_fn, reference_fn, inputs, *, max_logit=0.0,
                            reduction="mean"):
    """Loss and gradients of fused_fn(backend) vs reference_fn in float64 (and in dtype as the
    baseline of the low-precision error)."""
    weight = None

    def _run(fn, tensors):
        loss = fn(*tensors)
        total = loss.sum() * 1.5 if reduction != "none" else (loss * weight.to(loss.dtype)).sum()
        return loss, torch.autograd.grad(total, [t for t in tensors if t.requires_grad])

    ref_in = as_float64(*inputs)
    if reduction == "none":
        weight = torch.rand(
            reference_fn(*ref_in).shape, dtype=torch.float64, device=inputs[0].device
        )
    loss, grads = _run(lambda *t: fused_fn(*t, backend=backend), inputs)
    ref_loss, ref_grads = _run(reference_fn, ref_in)
    low = dtype in (torch.float16, torch.bfloat16)
    base_loss, base_grads = _run(reference_fn, inputs) if low else (None, [None] * len(grads))
    assert loss.dtype == dtype
    assert_close(loss, ref_loss, dtype, "loss", max_logit=max_logit, baseline=base_loss)
    for i, (g, r, b) in enumerate(zip(grads, ref_grads, base_grads)):
        assert g.dtype == inputs[i].dtype
        scale = None
        if inputs[i].dim() == 0:  # d tau = -(1/tau) sum dS s cancels: rounding ~ max|s| / tau
            scale = max(1.0, float(r.abs()), max_logit / float(inputs[i]))
        assert_close(g, r, dtype, f"grad[{i}]", max_logit=max_logit, baseline=b, scale=scale)


# ---------------------------------------------------------------------------------------------
# The symmetric-Gram path (nt_xent, supcon, info_nce of a set with itself) against the
# full-product path


GRAM_BACKENDS = ["torch", "cpu"]


def _value_and_grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    loss = fn(*inputs)
    grads = torch.autograd.grad(loss.sum(), inputs)
    return loss.detach(), grads


def gram_and_baseline(configure, fn, inputs):
    """(value, gradients) of fn(*inputs) on the symmetric-Gram ops and on the full-product
    path (FASTCONTRAST_GRAM=0, the baseline)."""
    gram = _value_and_grads(fn, inputs)
    configure(gram=False)
    base = _value_and_grads(fn, inputs)
    configure(gram=True)
    return gram, base


def assert_gram_same(gram, base, rtol, atol):
    torch.testing.assert_close(gram[0], base[0], rtol=rtol, atol=atol)
    for a, b in zip(gram[1], base[1]):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)

