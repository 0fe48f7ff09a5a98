"""False-negative filtering of info_nce, clip_loss and moco_loss (fastcontrast/infonce/
false_negatives.py): the margin rule and the guide rule (both margin strategies) on every backend
against the float64 reference, values, gradients and dropped counts; odd shapes, dtypes, tiny
temperatures; the margin's edge cases (large: the plain loss, ties, the positive never dropped);
torch.compile. Argument errors and the module twins: test_false_negatives_args.py.

A drop decision is discontinuous: a candidate within rounding of its threshold may be decided
differently in low precision than in float64. The margins below are therefore chosen in a gap
of the float64 score differences, wider than the dtype's rounding (``_separated``)."""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc

from .._helpers import (FUSED_BACKENDS, as_float64, assert_close,
                        assert_compiles_with_changing_batch_sizes, backend_usable, device_for,
                        interpreting_triton)
from fastcontrast import backends

BACKENDS = ("reference", *FUSED_BACKENDS)
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# How far a score difference must be from its threshold for a drop decision to be the same in
# the dtype as in float64 (similarity units; half precision: the kernels' normalised copies).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 3e-2,
             torch.float16: 1e-2}


def _skip(backend, dtype=torch.float32, n=1):
    if not backend_usable(backend, device_for(backend)):
        pytest.skip(f"backend {backend!r} unavailable here")
    if backend == "triton" and dtype not in backends.PROPERTIES["triton"].compute_dtypes:
        pytest.skip(f"triton kernels do not take {dtype}")
    if interpreting_triton(backend) and n > 64:
        pytest.skip("the Triton interpreter runs the small shapes")


def _rand(*shape, dtype=torch.float64, device="cpu", grad=True):
    t = torch.randn(*shape, dtype=torch.float64).to(dtype=dtype, device=device)
    return t.requires_grad_(grad)


def _separated(diffs, tol, lo, hi):
    """A value in [lo, hi] at least ``tol`` away from every value of ``diffs`` (the middle of
    the widest gap), or None."""
    values = diffs.flatten()
    values = values[torch.isfinite(values)]
    values = torch.cat([values[(values > lo) & (values < hi)],
                        values.new_tensor([lo - tol, hi + tol])]).sort().values
    gaps = values[1:] - values[:-1]
    best = int(gaps.argmax())
    if gaps[best] <= 2 * tol:
        return None
    return float(values[best] + gaps[best] / 2)


def _sims(query, key, bank, targets, normalize):
    """(similarities (N, M [+ K]), positive similarities (N,)) in float64."""
    q, k = query.detach().double(), key.detach().double()
    b = None if bank is None else bank.detach().double()
    if normalize:
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        b = None if b is None else F.normalize(b, dim=-1)
    t = torch.arange(q.shape[0]) if targets is None else targets.cpu()
    sims = q @ k.T if b is None else torch.cat([q @ k.T, q @ b.T], dim=1)
    return sims, (q * k[t]).sum(-1)


def _margins(inputs, tol, rule, symmetric=False):
    """(false_negative_margin, guide_margin) separated from the data's score differences."""
    sims, positive = _sims(inputs["query"], inputs["key"], inputs.get("negatives"),
                           inputs.get("targets"), inputs.get("normalize", True))
    diffs = [sims - positive[:, None]]
    gq, gk, *gb = inputs["guide"]
    gsims, gpositive = _sims(gq, gk, gb[0] if gb else None, inputs.get("targets"), True)
    gdiffs = [gsims - gpositive[:, None]]
    if symmetric:
        sims, positive = _sims(inputs["key"], inputs["query"], None, None,
                               inputs.get("normalize", True))
        diffs.append(sims - positive[:, None])
        gsims, gpositive = _sims(gk, gq, None, None, True)
        gdiffs.append(gsims - gpositive[:, None])
    margin = _separated(torch.cat([d.flatten() for d in diffs]), tol, 0.0, 0.6)
    guide_margin = _separated(-torch.cat([d.flatten() for d in gdiffs]), tol, 0.0, 0.6)
    if margin is None or guide_margin is None:
        pytest.skip("no margin separated from the scores by the dtype's rounding")
    return {"margin": dict(false_negative_margin=margin),
            "guide": dict(guide_margin=guide_margin),
            "both": dict(false_negative_margin=margin, guide_margin=guide_margin)}[rule]


# name -> (loss of (inputs, backend, filter options) -> loss or (loss, dropped), inputs)
def _info_nce(**options):
    def call(t, backend, opts):
        extra = {k: v for k, v in t.items()
                 if k in ("targets", "query_ids", "negative_ids", "normalize")}
        guide = None
        if "guide_margin" in opts:
            guide = tuple(g for g in t["guide"])
        return fc.info_nce(t["query"], t["key"], t.get("negatives"), temperature=t["tau"],
                           guide=guide, backend=backend, **extra, **options, **opts)
    return call


def _make(bank=False, targets=False, ids=False, m_extra=0, normalize=True, tau=0.3):
    def make(n, d, dtype, device):
        m = n + m_extra
        t = dict(query=_rand(n, d, dtype=dtype, device=device),
                 key=_rand(m, d, dtype=dtype, device=device), tau=tau)
        # keys near their query: some candidates beat the positive, some do not
        with torch.no_grad():
            t["key"][:n] += 0.7 * t["query"]
        guide = [_rand(n, 4, grad=False), _rand(m, 4, grad=False)]
        if bank:
            t["negatives"] = _rand(6, d, dtype=dtype, device=device)
            guide.append(_rand(6, 4, grad=False))
        t["guide"] = tuple(g.to(device) for g in guide)
        if targets:
            t["targets"] = torch.randint(0, m, (n,), device=device)
        if ids:
            t["query_ids"] = torch.randint(-1, 4, (n,), device=device)
            t["negative_ids"] = torch.randint(-1, 4, (6,), device=device)
        if not normalize:
            t["normalize"] = False
        return t
    return make


def _clip(t, backend, opts):
    guide = tuple(t["guide"]) if "guide_margin" in opts else None
    return fc.clip_loss(t["query"], t["key"], 1 / t["tau"], guide=guide, backend=backend, **opts)


def _moco(t, backend, opts):
    guide = tuple(t["guide"]) if "guide_margin" in opts else None
    return fc.moco_loss(t["query"], t["key"], t["negatives"], temperature=t["tau"], guide=guide,
                        backend=backend, **opts)


CASES = {
    "info_nce": (_info_nce(), _make()),
    "info_nce_grouped_keys": (_info_nce(), _make(targets=True, m_extra=5)),
    "info_nce_bank_with_ids": (_info_nce(), _make(bank=True, ids=True)),
    "info_nce_unnormalized": (_info_nce(), _make(normalize=False, tau=2.0)),
    "info_nce_tiny_temperature": (_info_nce(), _make(tau=0.01)),
    "info_nce_symmetric": (_info_nce(symmetric=True), _make()),
    "clip_loss": (_clip, _make(normalize=False, tau=0.5)),
    "moco_loss": (_moco, _make(bank=True)),
}
SYMMETRIC = ("info_nce_symmetric", "clip_loss")
SCALES = {"info_nce_unnormalized": 0.5, "info_nce_tiny_temperature": 100.0, "clip_loss": 2.0,
          "moco_loss": 1 / 0.3}


def _max_logit(case, inputs):
    scale = SCALES.get(case, 1 / 0.3)
    if "unnormalized" not in case and case != "clip_loss":
        return scale
    norms = [float(inputs[k].detach().norm(dim=-1).max()) for k in ("query", "key")]
    return scale * max(norms) ** 2


def _run(call, inputs, backend, opts):
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    loss, dropped = call(inputs, backend, dict(opts, return_dropped=True))
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return loss, dropped, dict(zip(leaves, grads))


def _float64(inputs):
    out = {}
    for k, v in inputs.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            out[k] = as_float64(v)[0].cpu()
        elif isinstance(v, torch.Tensor):
            out[k] = v.cpu()
        elif k == "guide":
            out[k] = tuple(g.double().cpu() for g in v)
        else:
            out[k] = v
    return out


@pytest.mark.parametrize("rule", ["margin", "guide", "both"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n,d", [(1, 3), (9, 16), (257, 3)], ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_every_backend_matches_the_float64_reference(backend, case, n, d, dtype, rule):
    _skip(backend, dtype, n)
    if dtype in (torch.float16, torch.bfloat16) and n > 9:
        pytest.skip("half precision checked on the small shapes (its rounding is near many "
                    "thresholds at N = 257)")
    call, make = CASES[case]
    inputs = make(n, d, dtype, device_for(backend))
    opts = _margins(inputs, TOLERANCE[dtype], rule, symmetric=case in SYMMETRIC)
    loss, dropped, grads = _run(call, inputs, backend, opts)
    inputs64 = _float64(inputs)
    ref, ref_dropped, ref_grads = _run(call, inputs64, "reference", opts)
    # The same reference in the test dtype: plain PyTorch's own error (the baseline; e.g.
    # 1 - p of a lone positive at temperature 0.01).
    low = {k: (v.detach().cpu().requires_grad_(v.requires_grad)
               if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
           for k, v in _float64(inputs).items()}
    low.update({k: v.detach().cpu().requires_grad_(True) for k, v in inputs.items()
                if isinstance(v, torch.Tensor) and v.requires_grad})
    base, _, base_grads = _run(call, low, "reference", opts)
    max_logit = _max_logit(case, inputs64)
    assert loss.dtype == dtype
    assert torch.equal(dropped.cpu(), ref_dropped), f"{backend}/{case} dropped counts"
    assert_close(loss, ref, dtype, f"{backend}/{case} loss", max_logit=max_logit, baseline=base)
    # A gradient is scale (p - 1) k: the rounding of p (u max_logit) times the scale 1 / tau
    # (a lone positive at tau = 0.01 in fp32: p - 1 ~ 1e-5, its gradient ~ 1e-3).
    grad_logit = max_logit * max(1.0, SCALES.get(case, 1 / 0.3))
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], dtype, f"{backend}/{case} d{name}",
                     max_logit=grad_logit, baseline=base_grads[name])


@pytest.mark.parametrize("strategy", ["absolute", "relative"])
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("case", ["info_nce_bank_with_ids", "clip_loss", "moco_loss"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_reductions_and_strategies_match_the_reference(backend, case, reduction, strategy):
    _skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    call, make = CASES[case]
    inputs = make(7, 5, dtype, device_for(backend))
    opts = dict(false_negative_margin=0.05, guide_margin=0.1, guide_margin_strategy=strategy,
                reduction=reduction)
    if dtype == torch.float32:
        opts.update(_margins(inputs, TOLERANCE[dtype], "both", case in SYMMETRIC))
    loss, dropped = call(inputs, backend, dict(opts, return_dropped=True))
    ref, ref_dropped = call(_float64(inputs), "reference", dict(opts, return_dropped=True))
    assert torch.equal(dropped.cpu(), ref_dropped)
    assert_close(loss, ref, dtype, f"{case} loss", max_logit=_max_logit(case, inputs))


def _materialised_gist(anchor, positive, guide_a, guide_p, tau, margin, strategy):
    """GISTEmbedLoss's rule (sentence-transformers) on the anchor-positive block, materialised."""
    sim = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T
    guided = F.normalize(guide_a, dim=-1) @ F.normalize(guide_p, dim=-1).T
    guided_sim = guided.diagonal().view(-1, 1)
    if strategy == "absolute":
        mask = guided > guided_sim - margin
    else:
        mask = guided > guided_sim - guided_sim.abs() * margin
    mask &= ~torch.eye(*mask.shape, dtype=torch.bool)
    sim = sim.masked_fill(mask, float("-inf")) / tau
    return F.cross_entropy(sim, torch.arange(sim.shape[0])), mask.sum(1)


def _materialised_qwen3(query, key, tau, margin):
    sim = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).T
    mask = sim > sim.diagonal().view(-1, 1) + margin
    mask &= ~torch.eye(*mask.shape, dtype=torch.bool)
    return F.cross_entropy(sim.masked_fill(mask, float("-inf")) / tau,
                           torch.arange(sim.shape[0])), mask.sum(1)


@pytest.mark.parametrize("strategy", ["absolute", "relative"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_guide_rule_is_gist_embed(backend, strategy):
    _skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k = _rand(12, 6), _rand(12, 6)
    gq, gk = _rand(12, 5, grad=False), _rand(12, 5, grad=False)
    expected, mask = _materialised_gist(q, k, gq, gk, 0.05, 0.1, strategy)
    dev = device_for(backend)
    loss, dropped = fc.info_nce(q.detach().to(dtype=dtype, device=dev),
                                k.detach().to(dtype=dtype, device=dev), temperature=0.05,
                                guide=(gq.to(dev), gk.to(dev)), guide_margin=0.1,
                                guide_margin_strategy=strategy, return_dropped=True,
                                backend=backend)
    assert torch.equal(dropped.cpu(), mask)
    assert_close(loss, expected, dtype, "loss", max_logit=20.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_margin_rule_is_qwen3_embedding(backend):
    _skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    k = _rand(16, 8, grad=False)
    k[1::2] = k[0::2] + 0.3 * _rand(8, 8, grad=False)  # pairs of near-duplicate keys
    q = k + 0.5 * _rand(16, 8, grad=False)
    q[0:6:2] = k[1:7:2] + 0.05 * _rand(3, 8, grad=False)  # nearer the partner than the positive
    expected, mask = _materialised_qwen3(q, k, 0.05, 0.02)
    dev = device_for(backend)
    loss, dropped = fc.info_nce(q.to(dtype=dtype, device=dev), k.to(dtype=dtype, device=dev),
                                temperature=0.05, false_negative_margin=0.02, return_dropped=True,
                                backend=backend)
    assert mask.sum() > 0
    assert torch.equal(dropped.cpu(), mask)
    assert_close(loss, expected, dtype, "loss", max_logit=20.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_margin_is_the_plain_loss(backend):
    _skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    dev = device_for(backend)
    q, k = _rand(2, 10, 5, dtype=dtype, device=dev)
    plain = fc.info_nce(q, k, temperature=0.1, backend=backend)
    loss, dropped = fc.info_nce(q, k, temperature=0.1, false_negative_margin=2.5,
                                return_dropped=True, backend=backend)
    assert int(dropped.sum()) == 0
    assert_close(loss, plain, dtype, "loss", scale=1e-3)
    assert_close(torch.autograd.grad(loss, q)[0], torch.autograd.grad(plain, q)[0], dtype,
                 "dquery", scale=1e-3)
    image, text = _rand(2, 9, 4, dtype=dtype, device=dev)
    clip, counts = fc.clip_loss(image, text, 3.0, false_negative_margin=1e6, return_dropped=True,
                                backend=backend)
    assert counts.shape == (2, 9) and int(counts.sum()) == 0
    assert_close(clip, fc.clip_loss(image, text, 3.0, backend=backend), dtype, "clip",
                 scale=1e-3)


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
def test_ties_are_kept_and_the_positive_is_never_dropped(backend):
    """Integer features: every score is exact in any order of summation. Key 1 equals key 0, the
    positive of row 0: a tie (not above the positive), kept at margin 0; a guide equal for every
    key drops nothing; a duplicated positive key is the positive's column only once."""
    _skip(backend)
    q = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 1.0], [2.0, 0.0, 1.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [3.0, 3.0, 3.0]], dtype=torch.float64)
    loss, dropped = fc.info_nce(q, k, temperature=1.0, normalize=False,
                                false_negative_margin=0.0, return_dropped=True, backend=backend)
    # row 0: s = (3, 3, 9), positive 3: key 1 ties (kept), key 2 dropped
    # row 1: s = (1, 1, 6), positive 1 (key 1): key 0 ties, key 2 dropped
    # row 2: s = (2, 2, 9), positive 9 (key 2): nothing above it
    assert dropped.tolist() == [1, 1, 0]
    lse = [torch.tensor(v, dtype=torch.float64).logsumexp(0)
           for v in ([3.0, 3.0], [1.0, 1.0], [2.0, 2.0, 9.0])]
    expected = (lse[0] - 3.0 + lse[1] - 1.0 + lse[2] - 9.0) / 3
    assert_close(loss, expected, torch.float64, "loss")
    same = torch.ones(3, 2, dtype=torch.float64)
    loss, dropped = fc.info_nce(q, k, temperature=1.0, normalize=False, guide=(same, same),
                                return_dropped=True, backend=backend)
    assert dropped.tolist() == [0, 0, 0]
    assert_close(loss, fc.info_nce(q, k, temperature=1.0, normalize=False, backend=backend),
                 torch.float64, "loss")


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("case", ["info_nce_bank_with_ids", "clip_loss", "moco_loss"])
def test_gradcheck_float64(backend, case):
    _skip(backend)
    call, make = CASES[case]
    inputs = make(5, 3, torch.float64, "cpu")
    opts = dict(false_negative_margin=0.05, guide_margin=0.05)
    opts.update(_margins(inputs, 1e-4, "both", case in SYMMETRIC))
    leaves = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        return call({**inputs, **dict(zip(leaves, tensors))}, backend, opts)

    assert torch.autograd.gradcheck(fn, [inputs[k] for k in leaves], eps=1e-7)


def test_tensor_temperature_gets_the_reference_gradient():
    q, k = torch.randn(2, 8, 6, dtype=torch.float64)
    k = k + q
    for backend in ("torch", "cpu") if backend_usable("cpu") else ("torch",):
        tau = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
        loss = fc.info_nce(q, k, temperature=tau, false_negative_margin=0.05, backend=backend)
        ref = fc.info_nce(q, k, temperature=tau, false_negative_margin=0.05, backend="reference")
        (grad,) = torch.autograd.grad(loss, tau)
        (ref_grad,) = torch.autograd.grad(ref, tau)
        assert_close(grad, ref_grad, torch.float64, f"{backend} dtemperature")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_compiles_with_changing_batch_sizes(backend):
    _skip(backend)

    def step(q, k):
        return fc.info_nce(q, k, temperature=0.2, false_negative_margin=0.1, backend=backend)

    assert_compiles_with_changing_batch_sizes(step, 2)
