"""Multiple positives across two sets (fastcontrast/infonce/multi_positive.py): info_nce with
query_labels / key_labels and clip_loss with labels, every backend against the float64
reference (values, gradients, dtypes, odd shapes, rows without a positive, symmetric), SupCon
as the special case of one set against itself, argument errors, module twins."""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc

from .._helpers import FUSED_BACKENDS, as_float64, assert_close, device_for
from .test_label_smoothing import BACKENDS, DTYPES, _rand, _skip, _skip_unchecked


def _labels(n, classes, device):
    return torch.randint(0, classes, (n,), device=device)


def _case(name, n, d, dtype, device):
    """(call of (inputs, backend) -> loss, inputs, 1 / temperature or logit scale)."""
    m = n + 3 if name in ("grouped", "with_bank") else n
    t = dict(query=_rand(n, d, dtype=dtype, device=device),
             key=_rand(m, d, dtype=dtype, device=device),
             query_labels=_labels(n, 3, device), key_labels=_labels(m, 3, device))
    options = {}
    if name == "with_bank":
        t["negatives"] = _rand(5, d, dtype=dtype, device=device)
    if name in ("symmetric", "symmetric_rare"):
        options["symmetric"] = True
    if name in ("rare_classes", "symmetric_rare"):  # most rows have no positive among 50 classes
        t["query_labels"], t["key_labels"] = _labels(n, 50, device), _labels(m, 50, device)
    if name == "clip":
        def clip(x, backend):
            return fc.clip_loss(x["query"], x["key"], 8.0, labels=x["query_labels"],
                                reduction=x.get("reduction", "mean"), backend=backend)
        return clip, t, 8.0

    def call(x, backend):
        return fc.info_nce(x["query"], x["key"], x.get("negatives"), temperature=0.25,
                           query_labels=x["query_labels"], key_labels=x["key_labels"],
                           reduction=x.get("reduction", "mean"), backend=backend, **options)
    return call, t, 4.0


# symmetric_rare: rows and columns without a positive, each left out of its own direction only.
CASES = ["grouped", "with_bank", "symmetric", "symmetric_rare", "rare_classes", "clip"]


def _value_and_grads(call, inputs, backend):
    leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    loss = call(inputs, backend)
    weight = torch.linspace(-1, 2, loss.numel(), dtype=loss.dtype, device=loss.device)
    total = (loss * weight).sum() if loss.dim() else loss
    return loss, dict(zip(leaves, torch.autograd.grad(total, list(leaves.values()))))


def _float64(inputs):
    return {k: (as_float64(v)[0].cpu() if isinstance(v, torch.Tensor) and v.is_floating_point()
                else (v.cpu() if isinstance(v, torch.Tensor) else v)) for k, v in inputs.items()}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n,d", [(1, 3), (10, 16), (257, 3)], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_every_backend_matches_the_float64_reference(backend, case, n, d, dtype, reduction):
    _skip_unchecked(backend, dtype, n)
    call, inputs, scale = _case(case, n, d, dtype, device_for(backend))
    inputs["reduction"] = reduction
    loss, grads = _value_and_grads(call, inputs, backend)
    ref, ref_grads = _value_and_grads(call, _float64(inputs), "reference")
    lowp = {k: (v.detach().cpu().requires_grad_(True) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else (v.cpu() if isinstance(v, torch.Tensor) else v))
            for k, v in inputs.items()}
    base, base_grads = _value_and_grads(call, lowp, "reference")
    max_logit = scale * (1.0 if case != "clip" else max(
        float(t.detach().norm(dim=-1).max()) ** 2 for t in (inputs["query"], inputs["key"])))
    assert loss.dtype == dtype
    assert_close(loss, ref, dtype, f"{backend}/{case} loss", max_logit=max_logit, baseline=base)
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], dtype, f"{backend}/{case} d{name}",
                     max_logit=max_logit, baseline=base_grads[name])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_set_against_itself_is_supcon(backend):
    _skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    z = _rand(12, 6, dtype=dtype, device=device_for(backend))
    labels = _labels(12, 4, z.device)
    loss = fc.info_nce(z, z, temperature=0.2, query_labels=labels, key_labels=labels,
                       exclude_self=True, backend=backend)
    assert_close(loss, fc.supcon(z, labels, temperature=0.2, backend="reference"), dtype, "loss",
                 max_logit=5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_distinct_labels_are_plain_info_nce_and_clip(backend):
    """Labels 0 .. N-1 on both sides: one positive per row, key i; the plain losses."""
    _skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = device_for(backend)
    q, k = _rand(9, 5, dtype=dtype, device=device), _rand(9, 5, dtype=dtype, device=device)
    ids = torch.arange(9, device=device)
    assert_close(fc.info_nce(q, k, temperature=0.3, query_labels=ids, key_labels=ids,
                             backend=backend),
                 fc.info_nce(q, k, temperature=0.3, backend="reference"), dtype, "info_nce",
                 max_logit=4.0)
    assert_close(fc.clip_loss(q, k, 5.0, labels=ids, backend=backend),
                 fc.clip_loss(q, k, 5.0, backend="reference"), dtype, "clip_loss",
                 max_logit=50.0)


def test_the_positive_mean_by_class_sums_equals_the_masked_mean():
    """loss_i = lse_i - mean over the keys sharing query i's label, written out."""
    q, k = torch.randn(7, 4, dtype=torch.float64), torch.randn(11, 4, dtype=torch.float64)
    ql, kl = torch.tensor([0, 1, 2, 0, 1, 5, 2]), torch.randint(0, 3, (11,))
    loss = fc.info_nce(q, k, temperature=0.5, query_labels=ql, key_labels=kl,
                       reduction="none", backend="cpu" if "cpu" in fc.available_backends()
                       else "torch")
    s = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).T / 0.5
    same = ql[:, None] == kl[None, :]
    expected = torch.logsumexp(s, 1) - (s * same).sum(1) / same.sum(1).clamp_min(1)
    expected = torch.where(same.any(1), expected, torch.zeros_like(expected))
    assert_close(loss, expected, torch.float64, "loss")
    assert loss[5] == 0  # label 5 has no key


@pytest.mark.parametrize("backend", ["reference", "torch", "cpu"])
@pytest.mark.parametrize("case", ["grouped", "symmetric", "symmetric_rare", "with_bank"])
def test_gradcheck_float64(backend, case):
    _skip(backend)
    call, inputs, _ = _case(case, 5, 3, torch.float64, "cpu")
    leaves = [k for k, v in inputs.items() if isinstance(v, torch.Tensor) and v.requires_grad]

    def fn(*tensors):
        return call({**inputs, **dict(zip(leaves, tensors))}, backend)

    assert torch.autograd.gradcheck(fn, [inputs[k] for k in leaves])


_ZEROS = torch.zeros(4, dtype=torch.long)


@pytest.mark.parametrize("kwargs, match", [
    (dict(query_labels=_ZEROS), "must be given together"),
    (dict(query_labels=torch.zeros(4), key_labels=_ZEROS),
     "query_labels must have dtype torch.int64"),
    (dict(query_labels=_ZEROS[:3], key_labels=_ZEROS), r"query_labels must have shape \(4,\)"),
    (dict(query_labels=_ZEROS, key_labels=_ZEROS, targets=_ZEROS), "targets must be None"),
    (dict(query_labels=_ZEROS, key_labels=_ZEROS, decoupled=True),
     "cannot be combined with decoupled"),
    (dict(query_labels=_ZEROS, key_labels=_ZEROS, label_smoothing=0.1), "cannot be combined"),
    (dict(query_labels=_ZEROS, key_labels=_ZEROS, in_batch_negatives=False,
          negatives=torch.randn(3, 2)), "in_batch_negatives=True")])
def test_bad_labels_are_refused(kwargs, match):
    q, k = torch.randn(2, 4, 2)
    negatives = kwargs.pop("negatives", None)
    with pytest.raises((ValueError, TypeError), match=match):
        fc.info_nce(q, k, negatives, **kwargs)


def test_module_twins_take_labels():
    q, k = torch.randn(2, 6, 4)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])
    assert torch.equal(fc.InfoNCELoss(0.2)(q, k, query_labels=labels, key_labels=labels),
                       fc.info_nce(q, k, temperature=0.2, query_labels=labels,
                                   key_labels=labels))
    clip = fc.ClipLoss(10.0, learnable=False)
    assert torch.equal(clip(q, k, labels=labels),
                       fc.clip_loss(q, k, clip.logit_scale, labels=labels))
    # The distributed twin takes them too (checked across ranks in tests/distributed): here,
    # without a process group, the call gets as far as asking for one.
    with pytest.raises(RuntimeError, match="init_process_group"):
        fc.ClipLoss(distributed="gather")(q, k, labels=labels)
