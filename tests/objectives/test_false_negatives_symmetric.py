"""The symmetric false-negative filter in one fused pass (fastcontrast/infonce/false_negatives.py,
the column rule of the kernel ops, fastcontrast/infonce/ops.py): each score tile is computed once,
entry (i, j) leaves row i's log-sum-exp by row i's thresholds and column j's by column j's.

Checked against materialised float64 formulas written here, independent of the reference backend
(which filters the two directions as two transposed problems):
  - the ops on every fused backend with a column rule that is NOT the row rule's transpose
    (thresholds of their own, positives off the diagonal, M != N), values, both lse, gradients
    of both terms and the dropped counts per direction; the CPU kernels also on many small tiles;
  - clip_loss on integer features (exact scores in every dtype), where entries are dropped in
    one direction only: the (2, N) counts, the loss and the gradients, fp64 to bf16, N = 1, 257."""
import pytest
import torch

import fastcontrast as fc
from fastcontrast import _config, backends
from fastcontrast.infonce import ops

from .._helpers import FUSED_BACKENDS, assert_close, device_for
from .test_false_negatives import _separated, _skip

NEG_INF = float("-inf")


def _materialised_drops(s, g, thr, pos, gthr, cthr, cpos, cgthr):
    """(row drops, column drops) (N, M) bool of the rules in ops.py, in float64."""
    n, m = s.shape
    row = torch.zeros(n, m, dtype=torch.bool)
    col = torch.zeros(n, m, dtype=torch.bool)
    if thr is not None:
        row |= s > thr[:, None]
        col |= s > cthr[None, :]
    if g is not None:
        row |= g > gthr[:, None]
        col |= g > cgthr[None, :]
    row[torch.arange(n), pos] = False
    col[cpos, torch.arange(m)] = False
    return row, col


def _problem(n, m, d, rule, seed):
    """Operands in float64 and a filter whose column rule has thresholds and positives of its own,
    each threshold at least 1e-3 away from every score it is compared with."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    keys = torch.randn(m, d, generator=gen, dtype=torch.float64)
    alpha = 1 + torch.rand(n, generator=gen, dtype=torch.float64)
    beta = 0.5 + torch.rand(m, generator=gen, dtype=torch.float64)
    s = alpha[:, None] * beta[None, :] * (q @ keys.T)
    gq = torch.nn.functional.normalize(torch.randn(n, 4, generator=gen, dtype=torch.float64), dim=1)
    gk = torch.nn.functional.normalize(torch.randn(m, 4, generator=gen, dtype=torch.float64), dim=1)
    g = gq @ gk.T
    f = dict(positive_col=torch.randint(0, m, (n,), generator=gen),
             col_positive_row=torch.randint(0, n, (m,), generator=gen))

    def between(values, count):  # thresholds in the gaps of the values they are compared with
        picks = []
        for k in range(count):
            v = values[k] if values.dim() == 2 else values
            lo, hi = float(v.min()) - 0.5, float(v.max()) + 0.5
            u = lo + (hi - lo) * float(torch.rand((), generator=gen))
            picks.append(_separated(v, 1e-3, u - 0.3 * (hi - lo), u + 0.3 * (hi - lo)))
        return torch.tensor([lo if p is None else p for p in picks], dtype=torch.float64)

    if rule in ("margin", "both"):
        f["threshold"], f["col_threshold"] = between(s, n), between(s.T, m)
    if rule in ("guide", "both"):
        f.update(guide_q=gq, guide_keys=gk, guide_threshold=between(g, n),
                 col_guide_threshold=between(g.T, m))
    return q, keys, alpha, beta, f


def _expected(q, keys, alpha, beta, f, row_grad, col_grad):
    """(row_lse, col_lse, dq, dkeys, row counts, column counts) materialised in float64."""
    q, keys = q.clone().requires_grad_(True), keys.clone().requires_grad_(True)
    s = alpha[:, None] * beta[None, :] * (q @ keys.T)
    g = f["guide_q"] @ f["guide_keys"].T if "guide_q" in f else None
    row, col = _materialised_drops(s.detach(), g, f.get("threshold"), f["positive_col"],
                                   f.get("guide_threshold"), f.get("col_threshold"),
                                   f["col_positive_row"], f.get("col_guide_threshold"))
    row_lse = s.masked_fill(row, NEG_INF).logsumexp(1)
    col_lse = s.masked_fill(col, NEG_INF).logsumexp(0)
    dq, dkeys = torch.autograd.grad((row_grad * row_lse).sum() + (col_grad * col_lse).sum(),
                                    (q, keys))
    return row_lse.detach(), col_lse.detach(), dq, dkeys, row.sum(1), col.sum(0)


def _kernel_call(backend, dtype, device, q, keys, alpha, beta, f):
    """The kernel module's arguments in its dtypes: the scales and thresholds in the backend's
    accumulation dtype (cpu: q's), the guide in q's."""
    scale_dtype = dtype if backend == "cpu" else torch.float32 if dtype != torch.float64 else dtype
    cast = {k: v.to(device) if v.dtype == torch.int64 else
            v.to(device=device, dtype=dtype if k.startswith("guide_") and k != "guide_threshold"
                 else scale_dtype)
            for k, v in f.items()}
    return (q.to(device=device, dtype=dtype), keys.to(device=device, dtype=dtype),
            alpha.to(device=device, dtype=scale_dtype), beta.to(device=device, dtype=scale_dtype),
            cast, scale_dtype)


@pytest.mark.parametrize("rule", ["margin", "guide", "both"])
@pytest.mark.parametrize("n,m", [(1, 1), (6, 9), (37, 33)], ids=str)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_column_rule_of_its_own_matches_the_materialised_formula(backend, n, m, rule):
    dtype = torch.float32 if backend == "triton" else torch.float64
    _skip(backend, dtype, n)
    device = device_for(backend)
    q, keys, alpha, beta, f = _problem(n, m, 5, rule, seed=n * 100 + m)
    gen = torch.Generator().manual_seed(7)
    row_grad = torch.rand(n, generator=gen, dtype=torch.float64)
    col_grad = torch.rand(m, generator=gen, dtype=torch.float64)
    row_lse, col_lse, dq, dkeys, row_counts, col_counts = _expected(q, keys, alpha, beta, f,
                                                                    row_grad, col_grad)
    qd, kd, ad, bd, fd, sdt = _kernel_call(backend, dtype, device, q, keys, alpha, beta, f)
    module = backends.kernels("infonce", backend)
    # cpu: also many tiles of a few queries and keys, and the exact (per-row max) passes
    runs = ([(dict(block_rows=4), True), ({}, True), ({}, False)] if backend == "cpu"
            else [({}, True)])
    for size, shared_shift in runs:
        with _config.override(shared_shift=shared_shift):
            _check_kernels(module, backend, dtype, device, (qd, kd, ad, bd, fd, sdt), size,
                           (row_lse, col_lse, dq, dkeys, row_counts, col_counts),
                           (row_grad, col_grad))


def _check_kernels(module, backend, dtype, device, operands, size, expected, grads):
    """The three kernels of ``module`` against the materialised (lse, gradients, counts)."""
    qd, kd, ad, bd, fd, sdt = operands
    row_lse, col_lse, dq, dkeys, row_counts, col_counts = expected
    row_grad, col_grad = grads
    got_row, got_col = module.masked_lse_forward(qd, kd, ad, bd, with_col_lse=True, **size,
                                                 **fd)
    assert_close(got_row, row_lse, dtype, f"{backend} row_lse")
    assert_close(got_col, col_lse, dtype, f"{backend} col_lse")
    got_dq, got_dk = module.masked_lse_backward(
        qd, kd, ad, bd, got_row, row_grad.to(device=device, dtype=sdt), got_col,
        col_grad.to(device=device, dtype=sdt), **size, **fd)
    assert_close(got_dq, dq, dtype, f"{backend} dq")
    assert_close(got_dk, dkeys, dtype, f"{backend} dkeys")
    counts = module.masked_lse_dropped(qd, kd, ad, bd, **size, **fd).cpu()
    assert torch.equal(counts, torch.cat([row_counts, col_counts])), f"{backend} counts"


def test_the_op_schema_and_fake_give_both_directions_counts():
    q, keys, alpha, beta, f = _problem(4, 6, 3, "margin", seed=3)
    args = (q, keys, alpha, beta, None, None, False, 0, "torch", f["threshold"],
            f["positive_col"], None, None, None, f["col_threshold"], f["col_positive_row"], None)
    assert ops.masked_lse_dropped(*args).shape == (10,)
    torch.library.opcheck(ops.masked_lse_dropped, args)
    forward = (q, keys, alpha, beta, None, None, False, 0, True, "torch")
    torch.library.opcheck(ops.masked_lse_forward, forward,
                          dict(threshold=f["threshold"], positive_col=f["positive_col"],
                               col_threshold=f["col_threshold"],
                               col_positive_row=f["col_positive_row"]))


def _integer_clip(n, seed):
    """Integer features: every score is exact in every dtype and summation order."""
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(-2, 3, (n, 3), generator=gen).double()
    text = image + torch.randint(-1, 2, (n, 3), generator=gen).double()
    return image, text


def _materialised_clip(image, text, scale, margin, decide=None):
    """(loss, (2, N) counts) of clip_loss with the margin rule, each direction its own positive:
    entries of ``decide`` (default the scores, offset scale * margin) above their row's (column's)
    positive's plus the offset are dropped from that direction."""
    s = scale * image @ text.T
    n = s.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    if decide is None:
        decide, offset = s.detach(), scale * margin
    else:
        offset = margin
    own = decide.diagonal()
    row = (decide > own[:, None] + offset) & ~eye
    col = (decide > own[None, :] + offset) & ~eye
    diag = s.diagonal()
    loss = 0.5 * ((s.masked_fill(row, NEG_INF).logsumexp(1) - diag).mean()
                  + (s.masked_fill(col, NEG_INF).logsumexp(0) - diag).mean())
    return loss, torch.stack([row.sum(1), col.sum(0)]), bool((row ^ col).any())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("n", [1, 12, 257])
@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_clip_drops_each_direction_apart(backend, n, dtype):
    _skip(backend, dtype, n)
    device = device_for(backend)
    image64, text64 = _integer_clip(n, seed=n)
    scale, margin = 0.25, 0.5  # integer scores: no difference within rounding of the margin
    image = image64.to(device=device, dtype=dtype).requires_grad_(True)
    text = text64.to(device=device, dtype=dtype).requires_grad_(True)
    loss, counts = fc.clip_loss(image, text, scale, false_negative_margin=margin,
                                return_dropped=True, backend=backend)
    i64, t64 = image64.clone().requires_grad_(True), text64.clone().requires_grad_(True)
    expected, expected_counts, one_sided = _materialised_clip(i64, t64, scale, margin)
    if n > 1:
        assert one_sided, "the data should drop some entry in one direction only"
    assert counts.shape == (2, n)
    assert torch.equal(counts.cpu(), expected_counts)
    assert loss.dtype == dtype
    assert_close(loss, expected, dtype, f"{backend} loss", max_logit=scale * 18)
    grads = torch.autograd.grad(loss, (image, text))
    ref_grads = torch.autograd.grad(expected, (i64, t64))
    for name, got, ref in zip(("dimage", "dtext"), grads, ref_grads):
        assert_close(got, ref, dtype, f"{backend} {name}", max_logit=scale * 18)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_clip_guide_counts_per_direction(backend):
    """The guide rule: column j compares g_ij with its own positive's guide similarity g_jj."""
    _skip(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = device_for(backend)
    gen = torch.Generator().manual_seed(11)
    image, text = torch.randn(2, 10, 4, generator=gen, dtype=torch.float64)
    gi, gt = torch.randn(2, 10, 3, generator=gen, dtype=torch.float64)
    g = torch.nn.functional.normalize(gi, dim=1) @ torch.nn.functional.normalize(gt, dim=1).T
    diag = g.diagonal()
    margin = _separated(torch.cat([(diag[:, None] - g).flatten(), (diag[None, :] - g).flatten()]),
                        1e-4, 0.0, 0.6)
    eye = torch.eye(10, dtype=torch.bool)
    row = (g > diag[:, None] - margin) & ~eye
    col = (g > diag[None, :] - margin) & ~eye
    assert (row ^ col).any()
    loss, counts = fc.clip_loss(image.to(device=device, dtype=dtype),
                                text.to(device=device, dtype=dtype), 2.0,
                                guide=(gi.to(device), gt.to(device)), guide_margin=margin,
                                return_dropped=True, backend=backend)
    assert torch.equal(counts.cpu(), torch.stack([row.sum(1), col.sum(0)]))
    ref = fc.clip_loss(image, text, 2.0, guide=(gi, gt), guide_margin=margin, backend="reference")
    assert_close(loss, ref, dtype, f"{backend} loss", max_logit=40.0)


@pytest.mark.parametrize("shared_shift", [True, False], ids=["shared", "exact"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16],
                         ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_clip_guide_dense_one_sided_drops(backend, dtype, shared_shift):
    """A guide that drops ~40% of the entries per direction, a good part of them in one direction
    only (as the benchmark suite's guide does): the CPU kernels apply these drops in their vector
    passes (shared shift) or give them back (exact passes). Guide vectors at multiples of 45
    degrees: their cosines differ by >= 0.29, so margin 0.5 decides alike in every dtype."""
    n = 257
    _skip(backend, dtype, n)
    device = device_for(backend)
    image64, text64 = _integer_clip(n, seed=5)
    gen = torch.Generator().manual_seed(6)
    angle_i = torch.randint(0, 8, (n,), generator=gen)
    angle_t = angle_i + torch.randint(-2, 3, (n,), generator=gen)  # own positive's cosine varies

    def unit(k):
        return torch.stack([torch.cos(k * torch.pi / 4), torch.sin(k * torch.pi / 4)], 1).double()

    gi, gt = unit(angle_i), unit(angle_t)
    scale, margin = 0.25, 0.5
    image = image64.to(device=device, dtype=dtype).requires_grad_(True)
    text = text64.to(device=device, dtype=dtype).requires_grad_(True)
    with _config.override(shared_shift=shared_shift):
        loss, counts = fc.clip_loss(image, text, scale, guide=(gi.to(device, dtype),
                                    gt.to(device, dtype)), guide_margin=margin,
                                    return_dropped=True, backend=backend)
        grads = torch.autograd.grad(loss, (image, text))
    i64, t64 = image64.clone().requires_grad_(True), text64.clone().requires_grad_(True)
    expected, expected_counts, one_sided = _materialised_clip(i64, t64, scale, -margin,
                                                              decide=gi @ gt.T)
    assert one_sided
    assert 0.25 < expected_counts.sum() / (2 * n * n) < 0.6
    assert torch.equal(counts.cpu(), expected_counts)
    assert_close(loss, expected, dtype, f"{backend} loss", max_logit=scale * 18)
    ref_grads = torch.autograd.grad(expected, (i64, t64))
    for name, got, ref in zip(("dimage", "dtext"), grads, ref_grads):
        assert_close(got, ref, dtype, f"{backend} {name}", max_logit=scale * 18)


@pytest.mark.parametrize("shared_shift", [True, False], ids=["shared", "exact"])
@pytest.mark.parametrize("rule", ["guide", "both"])
def test_a_nan_score_reaches_only_the_directions_that_keep_it(rule, shared_shift):
    """A NaN feature of query 0 makes its scores NaN: as in the materialised formula, the lse and
    the gradients are NaN where a direction keeps such an entry, and finite where the guide drops
    it from both (the CPU kernels' masked passes and their exact passes' give-back)."""
    _skip("cpu")
    q, keys, alpha, beta, f = _problem(37, 33, 5, rule, seed=11)
    q[0, 1] = float("nan")
    gen = torch.Generator().manual_seed(7)
    row_grad = torch.rand(37, generator=gen, dtype=torch.float64)
    col_grad = torch.rand(33, generator=gen, dtype=torch.float64)
    expected = _expected(q, keys, alpha, beta, f, row_grad, col_grad)[:4]
    module = backends.kernels("infonce", "cpu")
    with _config.override(shared_shift=shared_shift):
        row, col = module.masked_lse_forward(q, keys, alpha, beta, with_col_lse=True, **f)
        got = (row, col, *module.masked_lse_backward(q, keys, alpha, beta, row, row_grad, col,
                                                     col_grad, **f))
    assert 0 < int(expected[3].isnan().sum()) < expected[3].numel()
    for name, value, ref in zip(("row_lse", "col_lse", "dq", "dkeys"), got, expected):
        assert torch.equal(value.isnan(), ref.isnan()), name
        torch.testing.assert_close(value[~ref.isnan()], ref[~ref.isnan()], msg=name)
