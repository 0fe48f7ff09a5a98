"""Property-based tests (hypothesis): every public loss on every available backend against the
float64 reference (backend="reference" on float64 copies of the very same input values), for
drawn shapes (N 1..40, M, K, D 1..70 with 1 and 3 always likely), options (targets,
in_batch_negatives, exclude_self, symmetric, normalize, reduction, shared / per-query negatives,
DCL / DCLW / HCL, labels, multi-view, query_index), dtypes (float64, float32, bfloat16, float16,
tolerances by dtype), temperatures down to 0.01, large-norm inputs, one NaN / +-inf entry in a
random input, and layouts (transposed views, strided slices, expanded rows). Values and input
gradients must match; NaN and +-inf must sit in exactly the same places (for an infinite input
below float64 precision: the non-finite places; inf or NaN there depends on underflow).

Budget (environment variables):
    FASTCONTRAST_HYPOTHESIS_EXAMPLES  examples per loss (default 60: the file runs in about
                                      a minute on 2 cores); e.g. 5000 for a long run
    FASTCONTRAST_HYPOTHESIS_RANDOM    "1": fresh random examples each run (default: derandomized,
                                      the same examples on every run, as CI needs)
    FASTCONTRAST_HYPOTHESIS_SHRINK    "1": shrink a failing example to a minimal one (slow: every
                                      step reruns all backends; off by default)
Triton runs only tiny shapes under its interpreter (no GPU), and never float64. The reference
backend is checked in float32 and float64; in float16 / bfloat16 it is the baseline of the
allowed error (a fused result may be a few times as far from the truth), not a backend under test.
"""
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import fastcontrast
from fastcontrast import NegativeQueue

from ..._helpers import TOLERANCES, backend_usable, device_for, interpreting_triton
from .._cases import require_every_loss

EXAMPLES_ENV = "FASTCONTRAST_HYPOTHESIS_EXAMPLES"
RANDOM_ENV = "FASTCONTRAST_HYPOTHESIS_RANDOM"
SHRINK_ENV = "FASTCONTRAST_HYPOTHESIS_SHRINK"

_RANDOM = os.environ.get(RANDOM_ENV) == "1"
PROFILE = settings(
    max_examples=int(os.environ.get(EXAMPLES_ENV, "60")),
    deadline=None,
    derandomize=not _RANDOM,
    database=None,
    phases=[Phase.explicit, Phase.generate]
    + ([Phase.shrink] if os.environ.get(SHRINK_ENV) == "1" else []),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
    print_blob=_RANDOM,
)

BACKENDS = tuple(b for b in ("reference", "torch", "cpu", "triton")
                 if backend_usable(b, device_for(b)))
LOW = (torch.float16, torch.bfloat16)
# Largest |logit| the drawn inputs are scaled down to (docs/numerics.md section 2: no overflow
# up to 1e4); float16 lower so that losses, their sums and gradients stay inside its range.
MAX_LOGIT = {torch.float64: 1e4, torch.float32: 1e4, torch.bfloat16: 1e4, torch.float16: 300.0}

# ---------------------------------------------------------------------------------------------
# Strategies: shared pieces, then one option builder per loss


SIZES = st.integers(1, 40)
DIMS = st.one_of(st.sampled_from([1, 3]), st.integers(1, 70))
DTYPES = st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16])
TEMPERATURES = st.sampled_from([0.01, 0.05, 0.07, 0.2, 0.5, 1.0, 3.0])
SCALES = st.sampled_from([1e-3, 0.3, 1.0, 5.0, 40.0])  # input magnitude (large-norm inputs too)
REDUCTIONS = st.sampled_from(["mean", "sum", "none"])
LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
NONFINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def _indices(n, high):
    """A list of ``n`` ints in [0, high)."""
    return st.lists(st.integers(0, high - 1), min_size=n, max_size=n)


@st.composite
def objectives(draw, dclw=True):
    """DCL / DCLW / HCL options (or none)."""
    kind = draw(st.sampled_from(["plain", "dcl", "dclw", "hcl"] if dclw else
                                ["plain", "dcl", "hcl"]))
    if kind == "plain":
        return {}
    if kind == "dcl":
        return dict(decoupled=True)
    if kind == "dclw":
        return dict(decoupled=True, dclw_sigma=draw(st.sampled_from([0.1, 0.5, 2.0])))
    return dict(decoupled=draw(st.booleans()), hcl_beta=draw(st.sampled_from([0.0, 0.5, 10.0])),
                hcl_tau_plus=draw(st.sampled_from([0.0, 0.1, 0.5])))


def _base(draw, *, normalize=True):
    """Options every temperature-based loss takes."""
    options = dict(temperature=draw(TEMPERATURES), reduction=draw(REDUCTIONS))
    if normalize:
        options["normalize"] = draw(st.booleans())
    return options


@st.composite
def info_nce_options(draw, n, d):
    options = _base(draw)
    if draw(st.booleans()) and draw(st.booleans()):  # 1 in 4: the symmetric (CLIP) form
        return dict(options, symmetric=True), [(n, d), (n, d)]
    m, mode = n, draw(st.sampled_from(["default", "targets", "exclude_self"]))
    if mode == "targets":
        m = draw(SIZES)
        options["targets"] = draw(_indices(n, m))
    elif mode == "exclude_self" and n >= 2:
        options["targets"] = [(i + 1 + o) % n for i, o in enumerate(draw(_indices(n, n - 1)))]
        options["exclude_self"] = True
    options["in_batch_negatives"] = draw(st.booleans())
    options.update(draw(objectives()))
    shapes = [(n, d), (m, d)]
    negatives = draw(st.sampled_from([None, "bank", "per_query"]))
    if negatives is not None:
        k = draw(st.integers(1, 12))
        shapes.append((k, d) if negatives == "bank" else (n, k, d))
    return options, shapes


@st.composite
def nt_xent_options(draw, n, d):
    return dict(_base(draw), **draw(objectives())), [(n, d), (n, d)]


@st.composite
def supcon_options(draw, n, d):
    options = _base(draw)
    views = draw(st.sampled_from([None, 2, 3]))
    if views is None or draw(st.booleans()):
        options["labels"] = draw(_indices(n, draw(st.integers(1, n))))
    return options, [(n, d) if views is None else (n, views, d)]


@st.composite
def moco_options(draw, n, d):
    options = dict(_base(draw), **draw(objectives(dclw=False)))
    k = draw(st.integers(1, 16))
    if draw(st.booleans()):  # a NegativeQueue with stored indices: same-instance entries masked
        ids = draw(st.integers(1, n + k))
        options["query_index"] = draw(_indices(n, ids))
        options["queue_index"] = draw(_indices(k, ids))
    return options, [(n, d), (n, d), (k, d)]


@st.composite
def clip_options(draw, n, d):
    return dict(logit_scale=1 / draw(TEMPERATURES), reduction=draw(REDUCTIONS)), [(n, d), (n, d)]


@st.composite
def siglip_options(draw, n, d):
    return dict(logit_scale=draw(st.sampled_from([0.1, 1.0, 10.0, 100.0])),
                logit_bias=draw(st.sampled_from([-10.0, 0.0, 5.0])),
                reduction=draw(REDUCTIONS)), [(n, d), (n, d)]


OPTIONS = {"info_nce": info_nce_options, "nt_xent": nt_xent_options, "supcon": supcon_options,
           "moco_loss": moco_options, "clip_loss": clip_options, "siglip_loss": siglip_options}
require_every_loss(OPTIONS, "the property-based search", exempt={
    "distill_info_nce": "not searched yet: tests/objectives/test_distill.py",
    "distill_clip_loss": "not searched yet: tests/objectives/test_distill_clip.py"})


@st.composite
def examples(draw, loss):
    """One drawn case: the loss, its options, its inputs' shapes / layouts / scale / dtype, an
    optional non-finite entry (input, position in [0, 1), value) and the seed of the values."""
    n, d = draw(SIZES), draw(DIMS)
    options, shapes = draw(OPTIONS[loss](n, d))
    layouts = draw(st.lists(st.sampled_from(LAYOUTS), min_size=len(shapes),
                            max_size=len(shapes)))
    poison = None
    if draw(st.integers(0, 5)) == 5:  # 1 in 6
        poison = (draw(st.integers(0, len(shapes) - 1)), draw(st.floats(0, 1, exclude_max=True)),
                  draw(NONFINITE))
    return dict(loss=loss, options=options, shapes=shapes, layouts=layouts, dtype=draw(DTYPES),
                scale=draw(SCALES), poison=poison, seed=draw(st.integers(0, 2**31 - 1)))


# ---------------------------------------------------------------------------------------------
# Inputs: leaves in the drawn dtype and layout (the tensor handed to the loss is a view of
# its leaf), and the largest logit they can make


def _leaf_and_view(values, layout):
    """(leaf values, view(leaf) -> the tensor of shape values.shape the loss gets)."""
    if layout == "transposed":
        return values.transpose(-1, -2).contiguous(), lambda t: t.transpose(-1, -2)
    if layout == "strided":
        leaf = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
        leaf[..., ::2] = values
        return leaf, lambda t: t[..., ::2]
    if layout == "expanded":
        shape = values.shape
        return values[:1].clone(), lambda t: t.expand(shape)
    return values, lambda t: t


def _max_logit(example, values):
    """Cauchy-Schwarz bound on |logit| (finite values; the scale factor of the loss)."""
    norms = [torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0).norm(dim=-1).max()
             for v in values]
    options = example["options"]
    if example["loss"] == "siglip_loss":
        return float(options["logit_scale"] * norms[0] * norms[1]) + abs(options["logit_bias"])
    scale = options.get("logit_scale") or 1 / options["temperature"]
    bound = scale if options.get("normalize", False) else scale * float(max(norms)) ** 2
    return bound * (1 + options.get("hcl_beta", 0.0))


def _make_inputs(example):
    """(leaves in the drawn dtype, views of them, their largest logit)."""
    gen = torch.Generator().manual_seed(example["seed"])
    dtype = example["dtype"]
    values = [torch.randn(*shape, generator=gen, dtype=torch.float64) * example["scale"]
              for shape in example["shapes"]]
    limit = MAX_LOGIT[dtype]
    bound = _max_logit(example, values)
    if bound > limit:  # scale the inputs down until the logits fit
        factor = limit / bound if example["loss"] == "siglip_loss" else math.sqrt(limit / bound)
        values = [v * factor for v in values]
    leaves, views = [], []
    for v, layout in zip(values, example["layouts"]):
        leaf, view = _leaf_and_view(v, layout)
        leaves.append(leaf.to(dtype))
        views.append(view)
    if example["poison"] is not None:
        which, position, value = example["poison"]
        flat = leaves[which].view(-1)
        flat[int(position * flat.numel())] = value
    return leaves, views, _max_logit(example, [view(t.double()) for t, view in
                                               zip(leaves, views)])


def _call(example, tensors, backend):
    """The example's loss of ``tensors`` (already viewed) on ``backend``."""
    options = dict(example["options"])
    device = tensors[0].device
    for name in ("targets", "labels", "query_index", "queue_index"):
        if name in options:
            options[name] = torch.tensor(options[name], dtype=torch.int64, device=device)
    loss = example["loss"]
    if loss == "info_nce":
        return fastcontrast.info_nce(*tensors, backend=backend, **options)
    if loss == "nt_xent":
        return fastcontrast.nt_xent(*tensors, backend=backend, **options)
    if loss == "supcon":
        return fastcontrast.supcon(tensors[0], options.pop("labels", None), backend=backend,
                                   **options)
    if loss == "moco_loss":
        queue, queue_index = tensors[2], options.pop("queue_index", None)
        if queue_index is not None:
            queue = NegativeQueue(queue.shape[0], queue.shape[1], dtype=queue.dtype,
                                  device=device, store_indices=True)
            queue.enqueue(tensors[2].detach(), indices=queue_index)
        return fastcontrast.moco_loss(tensors[0], tensors[1], queue, backend=backend, **options)
    if loss == "clip_loss":
        return fastcontrast.clip_loss(*tensors, options.pop("logit_scale"), backend=backend,
                                      **options)
    scale, bias = options.pop("logit_scale"), options.pop("logit_bias")
    return fastcontrast.siglip_loss(*tensors, scale, bias, backend=backend, **options)


def _loss_and_grads(example, leaves, views, backend, dtype, device):
    """The loss and the gradients of the leaves (copies in ``dtype`` on ``device``) of
    sum(w * loss) with fixed random weights w in [0.5, 1.5) of the loss's shape, or the
    TypeError / ValueError the call raised."""
    leaves = [t.detach().to(dtype=dtype, device=device).requires_grad_(True) for t in leaves]
    try:
        loss = _call(example, [view(t) for t, view in zip(leaves, views)], backend)
    except (TypeError, ValueError) as error:
        return error, None
    gen = torch.Generator().manual_seed(example["seed"] + 1)
    weights = torch.rand(loss.shape, generator=gen, dtype=torch.float64) + 0.5
    (loss * weights.to(device=device, dtype=loss.dtype)).sum().backward()
    return loss.detach(), [t.grad for t in leaves]


def _backends(example):
    rows = sum(math.prod(shape[:-1]) for shape in example["shapes"])
    tiny = rows <= (12 if example["dtype"] == torch.bfloat16 else 24)
    for backend in BACKENDS:
        if backend == "reference" and example["dtype"] in LOW:
            continue  # there it is the baseline of the error, not a backend under test
        if backend == "triton" and (example["dtype"] == torch.float64 or (
                interpreting_triton(backend) and not (tiny and example["shapes"][0][-1] <= 16))):
            continue  # triton refuses float64; its interpreter runs only tiny shapes
        yield backend


# ---------------------------------------------------------------------------------------------
# Comparison: the non-finite pattern exactly; finite values within
#     rtol |expected| + atol max(1, max |expected|) + rounding + 3 e_baseline
# with (rtol, atol) by dtype (tests/_helpers.py), ``rounding`` the effect of logits as large as
# max_logit carrying an error of eps(dtype) |s| (the probabilities move by eps |s|, the gradient
# of a row by that times its sensitivity d s / d x ~ max_logit / |x_row|), and e_baseline the
# largest error of the reference run in the low dtype itself (float16 / bfloat16 only).


def _rounding_bounds(example, leaves, views, max_logit):
    """(bound for the loss values, per-leaf elementwise bounds for the gradients)."""
    options = example["options"]
    eps = torch.finfo(example["dtype"]).eps
    rows = sum(math.prod(view(t).shape[:-1]) for t, view in zip(leaves, views))
    # the upstream weights of all rows together: 1 for "mean", up to 1.5 per row otherwise
    weight = 1.0 if options["reduction"] == "mean" else 1.5 * rows
    error = 8 * eps * max(1.0, max_logit)  # of the probabilities, summed over a row
    value = error * (1.5 if options["reduction"] == "none" else weight)
    grads = []
    for leaf, view in zip(leaves, views):
        x = view(torch.nan_to_num(leaf.double(), nan=0.0, posinf=0.0, neginf=0.0))
        norms = x.norm(dim=-1, keepdim=True)
        denominator = norms if options.get("normalize", False) else norms.max()
        sensitivity = (max(1.0, max_logit) / denominator.clamp_min(1e-30)).expand_as(x)
        # onto the leaf through the adjoint of its layout (expanded rows add up)
        dummy = torch.zeros_like(leaf, dtype=torch.float64, requires_grad=True)
        adjoint, = torch.autograd.grad(view(dummy), dummy, sensitivity.contiguous())
        grads.append(error * weight * adjoint)
    return value, grads


def _assert_matches(actual, expected, dtype, name, rounding, baseline=None, *, exact=True):
    """``exact``: NaN, +inf and -inf each in the same places; else (an infinite input at less
    than float64 precision) only the non-finite places must agree: whether p * inf is inf or NaN
    there depends on whether p underflowed to 0, i.e. on the precision."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    patterns = (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf))
    if not exact:
        patterns = (("non-finite", lambda t: ~torch.isfinite(t)),)
    for what, test in patterns:
        got, want = test(actual), test(expected)
        assert torch.equal(got, want), (
            f"{name}: {what} at {int(got.sum())} places, expected at {int(want.sum())}; "
            f"unexpected at {(got & ~want).nonzero().tolist()[:6]}, missing at "
            f"{(want & ~got).nonzero().tolist()[:6]}")
    finite = torch.isfinite(expected)
    if not finite.any():
        return
    rtol, atol = TOLERANCES[dtype]
    expected_f = torch.where(finite, expected, torch.zeros_like(expected))
    bound = rtol * expected_f.abs() + atol * max(1.0, float(expected_f.abs().max())) + rounding
    if baseline is not None:
        off = (baseline.detach().to(torch.float64).cpu() - expected_f)[finite]
        off = off[torch.isfinite(off)]
        bound = bound + 3 * (float(off.abs().max()) if off.numel() else 0.0)
    err = torch.where(finite, actual - expected_f, torch.zeros_like(actual)).abs()
    bad = err > bound
    if bad.any():
        at = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} elements differ; first at "
            f"{list(at)}: actual {float(actual[at]):.8e} expected {float(expected[at]):.8e} "
            f"(error {float(err[at]):.3e}, allowed {float(bound[at]):.3e})")


def _check(example):
    leaves, views, max_logit = _make_inputs(example)
    dtype = example["dtype"]
    # float64 truth on the very same values (the leaves already hold the dtype's rounding)
    expected, expected_grads = _loss_and_grads(example, leaves, views, "reference",
                                               torch.float64, "cpu")
    if example["poison"] is None and not isinstance(expected, Exception):
        for t in (expected, *expected_grads):
            assert t is None or torch.isfinite(t).all(), (
                "the float64 reference itself is not finite on finite inputs")
    if dtype == torch.float16 and not isinstance(expected, Exception):
        finite = [t[torch.isfinite(t)] for t in (expected, *expected_grads) if t is not None]
        assume(all(float(t.abs().max()) < 3e4 for t in finite if t.numel()))  # fp16's range
    baseline, baseline_grads = (None, [None] * len(leaves))
    if dtype in LOW and not isinstance(expected, Exception):
        baseline, baseline_grads = _loss_and_grads(example, leaves, views, "reference", dtype,
                                                   "cpu")
    value_bound, grad_bounds = _rounding_bounds(example, leaves, views, max_logit)
    poison = example["poison"]
    exact = dtype == torch.float64 or poison is None or math.isnan(poison[2])
    for backend in _backends(example):
        loss, grads = _loss_and_grads(example, leaves, views, backend, dtype,
                                      device_for(backend))
        if isinstance(expected, Exception):
            assert type(loss) is type(expected), (
                f"{backend}: reference raised {expected!r}, the backend gave {loss!r}")
            continue
        assert not isinstance(loss, Exception), f"{backend} raised {loss!r}"
        assert loss.dtype == dtype, f"{backend}: loss dtype {loss.dtype}"
        _assert_matches(loss, expected, dtype, f"{backend} loss", value_bound, baseline,
                        exact=exact)
        for i, (g, r, b) in enumerate(zip(grads, expected_grads, baseline_grads)):
            assert (g is None) == (r is None), f"{backend} grad[{i}]: {g} vs reference {r}"
            if r is not None:
                assert g.dtype == dtype, f"{backend} grad[{i}] dtype {g.dtype}"
                _assert_matches(g, r, dtype, f"{backend} grad[{i}]", grad_bounds[i], b,
                                exact=exact)


@pytest.mark.parametrize("loss", list(OPTIONS))
def test_every_backend_matches_the_float64_reference(loss):
    @PROFILE
    @given(example=examples(loss))
    def check(example):
        _check(example)

    check()
