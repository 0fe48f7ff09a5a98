"""NaN and +-inf through every kernel op, on every backend that runs here: the outputs equal, NaN
and infinities included, what float64 PyTorch gives for the same math (tests/_helpers.py,
masked_lse_truth; SigLIP: autograd through the log-sigmoid formula of the reference).

    row_lse_i = logsumexp_j of the masked scores: NaN if an unmasked score is NaN, +inf if one
                is +inf and none is NaN, -inf only when every unmasked score is -inf or the row
                has none; col_lse likewise
    gradients:  dS_ij = 0 where masked (a NaN lse or a NaN upstream gradient never reaches a
                masked entry), IEEE arithmetic elsewhere, through IEEE products with the inputs

Inputs: NaN in one key or one query (normalised: the scales are NaN too, or the backend's unit
rows), +-inf entries of unnormalised keys and queries, a NaN score inside a masked entry
(inf * 0) next to unmasked -inf scores, rows whose every entry is masked, NaN lse values and
upstream gradients given to the backward; each under no mask, the diagonal mask, id masks.
End to end: the public losses with a NaN queue entry or key are NaN exactly where
backend="reference" is (NaN / inf patterns of the losses and of the input gradients)."""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast as fc
from fastcontrast import backends

from .._helpers import (KERNEL_TOLERANCES, device_for, masked_lse_truth,
                       masked_scores)

OPS = torch.ops.fastcontrast
NAN, INF = float("nan"), float("inf")
N, M, D = 6, 7, 5
DTYPE_CASES = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")
               for name, props in backends.PROPERTIES.items() for dtype in props.compute_dtypes]
FUSED_DTYPE_CASES = [c for c in DTYPE_CASES if backends.PROPERTIES[c.values[0]].fuses_gradient]
INPUTS = ["nan_key", "nan_query", "inf_key", "inf_query", "nan_in_masked"]
MASKS = ["none", "diag", "diag+1", "ids", "empty_rows"]

# Overflow / invalid values in numpy are what these inputs are about (the Triton interpreter).
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def _poisoned_outputs(configure):
    configure(poison_outputs=True)
    configure(torch_chunk_elements=16)  # chunks of 2 rows


def _skip_unavailable(backend):
    if backend not in backends.available_backends(device_for(backend)):
        pytest.skip(f"backend {backend!r} cannot run here")


def _mask(kind, device):
    """Fixed masks (exclude_diag, diag_offset, row_ids, col_ids): every row keeps entries except
    under "empty_rows", where the even rows have none."""
    row_ids = col_ids = None
    if kind == "ids":
        row_ids, col_ids = torch.tensor([0, 1, 0, 1, -1, 2]), torch.tensor([0, 1, 1, 0, 2, -1, 0])
    elif kind == "empty_rows":
        row_ids, col_ids = torch.tensor([7, -1, 7, -1, 7, -1]), torch.full((M,), 7)
    if row_ids is not None:
        row_ids, col_ids = row_ids.to(device), col_ids.to(device)
    return dict(exclude_diag=kind.startswith("diag"), diag_offset=1 if kind == "diag+1" else 0,
                row_ids=row_ids, col_ids=col_ids)


def _problem(backend, dtype, kind):
    """(q, keys, alpha, beta) as the host passes them. "nan_*": normalised inputs with one NaN
    entry (inverse norms in alpha / beta, or unit rows for a backend that prefers them);
    "inf_*", "nan_in_masked": unnormalised (alpha = 1 / tau, beta = 1) with infinite entries;
    "nan_in_masked": q_0 = (inf, 0, ...) and keys_j0 <= 0 with keys_00 = 0, so row 0 has the NaN
    score inf * 0 at (0, 0) (masked under every mask but "none" and "ids") and -inf elsewhere."""
    f64 = torch.float64
    q, keys = torch.randn(N, D, dtype=f64), torch.randn(M, D, dtype=f64)
    inv_tau = 3.0
    if kind.startswith("nan_") and kind != "nan_in_masked":
        (keys if kind == "nan_key" else q)[2, 1] = NAN
        if backends.PROPERTIES[backend].prenormalized:
            q, keys = F.normalize(q, dim=1), F.normalize(keys, dim=1)
            alpha, beta = torch.full((N,), inv_tau, dtype=f64), torch.ones(M, dtype=f64)
        else:
            alpha, beta = inv_tau / q.norm(dim=1), 1.0 / keys.norm(dim=1)
    else:
        alpha, beta = torch.full((N,), inv_tau, dtype=f64), torch.ones(M, dtype=f64)
        if kind == "inf_key":
            keys[3, 1], keys[5, 2] = INF, -INF
        elif kind == "inf_query":
            q[2, 0] = -INF
        else:
            q[0] = 0.0
            q[0, 0] = INF
            keys[:, 0] = -keys[:, 0].abs()
            keys[0, 0] = 0.0
    device, vec = device_for(backend), backends.PROPERTIES[backend].output_dtype(dtype)
    return (q.to(device=device, dtype=dtype), keys.to(device=device, dtype=dtype),
            alpha.to(device=device, dtype=vec), beta.to(device=device, dtype=vec))


def _assert_same(actual, expected, dtype, name):
    """NaN, +inf and -inf exactly where ``expected`` has them; the finite values within the
    kernel tolerance of ``dtype`` relative to the largest finite expected value."""
    actual = actual.detach().cpu().to(torch.float64)
    expected = expected.detach().cpu().to(torch.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    for what, where in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        got, want = where(actual), where(expected)
        assert torch.equal(got, want), (f"{name}: {what} at {got.nonzero().tolist()}, expected "
                                        f"at {want.nonzero().tolist()}\n{actual}\n{expected}")
    rtol, atol = KERNEL_TOLERANCES[dtype]
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(scale, 1e-6),
                               equal_nan=True, msg=lambda m: f"{name} ({dtype}): {m}")


def _vec(backend, dtype):
    return backends.PROPERTIES[backend].output_dtype(dtype)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kind", INPUTS)
@pytest.mark.parametrize("backend,dtype", DTYPE_CASES)
def test_masked_lse_nonfinite_inputs(backend, dtype, kind, mask):
    """Forward (row and column lse), backward with the row and column terms, and the fused
    forward-with-gradient, against the float64 truth on the very inputs the kernel got."""
    _skip_unavailable(backend)
    q, keys, alpha, beta = _problem(backend, dtype, kind)
    masks = _mask(mask, q.device)
    vec = _vec(backend, dtype)
    row, col = OPS.masked_lse_forward(q, keys, alpha, beta, masks["row_ids"], masks["col_ids"],
                                      masks["exclude_diag"], masks["diag_offset"], True, backend)
    truth = masked_lse_truth(q, keys, alpha, beta, **masks)
    _assert_same(row, truth.row_lse, dtype, "row_lse")
    _assert_same(col, truth.col_lse, dtype, "col_lse")

    row_grad = torch.rand(N, dtype=vec, device=q.device) + 0.5
    col_grad = torch.rand(M, dtype=vec, device=q.device) - 0.5
    dq, dkeys = OPS.masked_lse_backward(q, keys, alpha, beta, row, row_grad, col, col_grad,
                                        masks["row_ids"], masks["col_ids"],
                                        masks["exclude_diag"], masks["diag_offset"], True, True,
                                        backend)
    truth = masked_lse_truth(q, keys, alpha, beta, row_lse=row, row_grad=row_grad, col_lse=col,
                             col_grad=col_grad, **masks)
    _assert_same(dq, truth.dq, dtype, "dq")
    _assert_same(dkeys, truth.dkeys, dtype, "dkeys")

    if backends.PROPERTIES[backend].fuses_gradient:
        lse, dq, dkeys = OPS.masked_lse_forward_with_grad(
            q, keys, alpha, beta, row_grad, masks["row_ids"], masks["col_ids"], None,
            masks["exclude_diag"], masks["diag_offset"], True, True, backend)
        truth = masked_lse_truth(q, keys, alpha, beta, row_grad=row_grad, **masks)
        _assert_same(lse, truth.row_lse, dtype, "fused row_lse")
        _assert_same(dq, truth.dq, dtype, "fused dq")
        _assert_same(dkeys, truth.dkeys, dtype, "fused dkeys")


def _finite_problem(backend, dtype):
    q, keys = torch.randn(N, D, dtype=torch.float64), torch.randn(M, D, dtype=torch.float64)
    device, vec = device_for(backend), _vec(backend, dtype)
    return (q.to(device=device, dtype=dtype), keys.to(device=device, dtype=dtype),
            torch.full((N,), 2.0, dtype=vec, device=device),
            torch.ones(M, dtype=vec, device=device))


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend,dtype", DTYPE_CASES)
def test_nan_lse_and_gradients_never_reach_masked_entries(backend, dtype, mask):
    """Finite inputs, but a NaN row lse, a NaN column lse, a +inf row lse and a NaN upstream
    gradient given to the backward: NaN where unmasked, and a masked entry contributes 0 (so
    keys masked for those rows keep finite gradients)."""
    _skip_unavailable(backend)
    q, keys, alpha, beta = _finite_problem(backend, dtype)
    masks = _mask(mask, q.device)
    vec = _vec(backend, dtype)
    row, col = OPS.masked_lse_forward(q, keys, alpha, beta, masks["row_ids"], masks["col_ids"],
                                      masks["exclude_diag"], masks["diag_offset"], True, backend)
    row, col = row.clone(), col.clone()
    row[1], row[4], col[2] = NAN, INF, NAN
    row_grad = torch.rand(N, dtype=vec, device=q.device) + 0.5
    row_grad[3] = NAN
    col_grad = torch.rand(M, dtype=vec, device=q.device) + 0.5
    for cols in (False, True):
        col_args = (col, col_grad) if cols else (None, None)
        dq, dkeys = OPS.masked_lse_backward(q, keys, alpha, beta, row, row_grad, *col_args,
                                            masks["row_ids"], masks["col_ids"],
                                            masks["exclude_diag"], masks["diag_offset"], True,
                                            True, backend)
        truth = masked_lse_truth(q, keys, alpha, beta, row_lse=row, row_grad=row_grad,
                                 col_lse=col_args[0], col_grad=col_args[1], **masks)
        _assert_same(dq, truth.dq, dtype, f"dq (columns: {cols})")
        _assert_same(dkeys, truth.dkeys, dtype, f"dkeys (columns: {cols})")
        if mask == "empty_rows":
            assert torch.equal(dq[0::2].cpu(), torch.zeros(3, D, dtype=dq.dtype)), dq


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("backend,dtype", FUSED_DTYPE_CASES)
def test_fused_extra_lse_and_gradients(backend, dtype, mask):
    """masked_lse_forward_with_grad with NaN / +inf / -inf extra lse values and a NaN upstream
    gradient: the merged lse as torch.logaddexp, the gradients as the truth."""
    _skip_unavailable(backend)
    q, keys, alpha, beta = _finite_problem(backend, dtype)
    masks = _mask(mask, q.device)
    vec = _vec(backend, dtype)
    extra = torch.tensor([NAN, INF, -INF, 0.5, -INF, 2.0], dtype=vec, device=q.device)
    row_grad = torch.rand(N, dtype=vec, device=q.device) + 0.5
    row_grad[5] = NAN
    lse, dq, dkeys = OPS.masked_lse_forward_with_grad(
        q, keys, alpha, beta, row_grad, masks["row_ids"], masks["col_ids"], extra,
        masks["exclude_diag"], masks["diag_offset"], True, True, backend)
    truth = masked_lse_truth(q, keys, alpha, beta, row_grad=row_grad, extra_lse=extra, **masks)
    _assert_same(lse, truth.row_lse, dtype, "row_lse")
    _assert_same(dq, truth.dq, dtype, "dq")
    _assert_same(dkeys, truth.dkeys, dtype, "dkeys")


def test_truth_is_autograd_through_the_masked_scores():
    """The truth's gradients are autograd's through where(masked, -inf, s) and logsumexp, NaN
    and +-inf included, wherever autograd follows the contract: an lse of -inf over entries
    that are all -inf but not masked gives autograd exp(-inf + inf) = NaN, the contract 0."""
    checked = 0
    for kind in ("nan_key", "nan_query", "inf_key", "inf_query"):
        for mask in ("none", "diag", "ids", "empty_rows"):
            q, keys, alpha, beta = _problem("torch", torch.float64, kind)
            masks = _mask(mask, "cpu")
            g, c = torch.rand(N, dtype=torch.float64), torch.rand(M, dtype=torch.float64)
            qa, ka = q.clone().requires_grad_(), keys.clone().requires_grad_()
            s = alpha[:, None] * beta[None, :] * (qa @ ka.T)
            masked = torch.isneginf(masked_scores(torch.zeros(N, 1), torch.zeros(M, 1),
                                                  torch.ones(N), torch.ones(M), **masks))
            own = masked_lse_truth(q, keys, alpha, beta, **masks)
            if ((torch.isneginf(own.row_lse) & ~masked.all(1)).any()
                    or (torch.isneginf(own.col_lse) & ~masked.all(0)).any()):
                continue
            checked += 1
            s = torch.where(masked, torch.full_like(s, -INF), s)
            ((g * torch.logsumexp(s, 1)).sum() + (c * torch.logsumexp(s, 0)).sum()).backward()
            truth = masked_lse_truth(q, keys, alpha, beta, row_grad=g, col_grad=c, **masks)
            name = f"{kind}-{mask}"
            _assert_same(truth.dq, qa.grad, torch.float64, f"{name} dq")
            _assert_same(truth.dkeys, ka.grad, torch.float64, f"{name} dkeys")
    assert checked >= 10


# ---------------------------------------------------------------------------------------------
# SigLIP


def _siglip_truth(x, y, scale, bias, row_grad):
    """(loss, gx, gy, dz_total) in float64 by autograd through -logsigmoid(y_ij z_ij):
    z = scale <x_i, y_j> + bias, gx = dz @ y, gy = dz^T @ x, dz_total = sum dz (the op contract,
    fastcontrast/siglip.py)."""
    x64, y64 = (t.detach().cpu().to(torch.float64) for t in (x, y))
    z = (float(scale) * x64 @ y64.T + float(bias)).requires_grad_()
    labels = 2 * torch.eye(x.shape[0], y.shape[0], dtype=torch.float64) - 1
    loss = -F.logsigmoid(labels * z).sum(1)
    (loss * row_grad.detach().cpu().to(torch.float64)).sum().backward()
    dz = z.grad
    return loss.detach(), dz @ y64, dz.T @ x64, dz.sum()


@pytest.mark.parametrize("kind", ["nan_image", "nan_text", "inf_image", "inf_text", "both_inf"])
@pytest.mark.parametrize("backend,dtype", DTYPE_CASES)
def test_siglip_nonfinite_inputs(backend, dtype, kind):
    _skip_unavailable(backend)
    x, y = torch.randn(N, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    if kind == "nan_image":
        x[1, 2] = NAN
    elif kind == "nan_text":
        y[4, 0] = NAN
    elif kind == "inf_image":
        x[0, 3] = -INF
    elif kind == "inf_text":
        y[2, 1] = INF
    else:  # +inf and -inf in one product: inf - inf = NaN scores in row 3
        x[3, 0], x[3, 1], y[5, 0], y[5, 1] = INF, INF, 1.0, -1.0
    device, vec = device_for(backend), _vec(backend, dtype)
    x, y = x.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
    scale, bias = (torch.tensor(v, dtype=vec, device=device) for v in (4.0, -2.0))
    row_grad = torch.rand(N, dtype=vec, device=device) + 0.5
    loss, gx, gy, dz_total = _siglip_truth(x, y, scale, bias, row_grad)
    _assert_same(OPS.siglip_forward(x, y, scale, bias, backend), loss, dtype, "loss")
    got = OPS.siglip_backward(x, y, scale, bias, row_grad, True, True, backend)
    for name, a, e in zip(("gx", "gy", "dz_total"), got, (gx, gy, dz_total)):
        _assert_same(a, e, dtype, name)
    if backends.PROPERTIES[backend].fuses_gradient:
        got = OPS.siglip_forward_with_grad(x, y, scale, bias, row_grad, True, True, backend)
        for name, a, e in zip(("loss", "gx", "gy", "dz_total"), got, (loss, gx, gy, dz_total)):
            _assert_same(a, e, dtype, f"fused {name}")


# ---------------------------------------------------------------------------------------------
# End to end: the public losses, NaN / inf patterns as backend="reference"


def _e2e_cases():
    def moco(t, backend):
        return fc.moco_loss(t["q"], t["k"], t["bank"], reduction="none", backend=backend)

    def info_nce_bank(t, backend):
        return fc.info_nce(t["q"], t["k"], t["bank"], reduction="none", backend=backend)

    def info_nce(t, backend):
        return fc.info_nce(t["q"], t["k"], reduction="none", backend=backend)

    def info_nce_symmetric(t, backend):
        return fc.info_nce(t["q"], t["k"], symmetric=True, reduction="none", backend=backend)

    def clip(t, backend):
        return fc.clip_loss(t["q"], t["k"], 10.0, reduction="none", backend=backend)

    def nt_xent(t, backend):
        return fc.nt_xent(t["q"], t["k"], reduction="none", backend=backend)

    def supcon(t, backend):
        labels = torch.tensor([0, 1, 0, 1, 2, 2])
        return fc.supcon(t["q"], labels, reduction="none", backend=backend)

    return [("moco-nan_queue", moco, "bank", NAN), ("moco-nan_key", moco, "k", NAN),
            ("info_nce_bank-nan_queue", info_nce_bank, "bank", NAN),
            ("info_nce-nan_key", info_nce, "k", NAN),
            ("info_nce_symmetric-nan_key", info_nce_symmetric, "k", NAN),
            ("clip-nan_text", clip, "k", NAN), ("clip-inf_text", clip, "k", INF),
            ("nt_xent-nan_view", nt_xent, "k", NAN), ("supcon-nan_feature", supcon, "q", NAN)]


E2E = _e2e_cases()


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("case", E2E, ids=[c[0] for c in E2E])
def test_public_losses_nan_where_the_reference_is(case, backend):
    _skip_unavailable(backend)
    _, loss_fn, where, value = case
    device = device_for(backend)
    base = {"q": torch.randn(N, D), "k": torch.randn(N, D), "bank": torch.randn(9, D)}
    base[where][2, 1] = value
    results = {}
    for name in ("reference", backend):
        t = {k: v.to(device).requires_grad_() for k, v in base.items()}
        loss = loss_fn(t, name)
        loss.sum().backward()
        results[name] = [loss] + [t[k].grad if t[k].grad is not None else torch.zeros(0)
                                  for k in ("q", "k", "bank")]
    for what, ref, got in zip(("loss", "dq", "dk", "dbank"), results["reference"],
                              results[backend]):
        for label, where_fn in (("NaN", torch.isnan), ("+inf", torch.isposinf),
                                ("-inf", torch.isneginf)):
            expected, actual = where_fn(ref.detach().cpu()), where_fn(got.detach().cpu())
            assert torch.equal(actual, expected), (
                f"{what}: {label} at {actual.nonzero().tolist()}, reference at "
                f"{expected.nonzero().tolist()}")
