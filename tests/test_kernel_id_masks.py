"""The id mask of the masked-LSE kernels, on every backend: entry (i, j) is excluded where
row_ids[i] == col_ids[j] >= 0 (on top of the diagonal mask). This is what removes the positive
from the denominator (DCL) and same-instance negatives from a queue (MoCo with stored indices).

Each backend's forward (row and column lse), backward and fused forward-with-gradient are
compared with the float64 formula on materialised scores."""
import pytest
import torch

from fastcontrast import _ext, _torch_chunked
from fastcontrast.functional import available_backends

SHAPES = [(1, 1, 3), (9, 13, 5), (70, 33, 100)]  # (N, M, D): N = 1, more keys, more queries


def _ops(name):
    if name not in available_backends("cpu"):
        pytest.skip(f"backend {name!r} is unavailable here")
    if name == "triton":
        from fastcontrast.kernels import infonce

        return infonce
    return {"torch": _torch_chunked, "cpu": _ext}[name]


def _dtype(name):
    return torch.float32 if name == "triton" else torch.float64


def _problem(n, m, d, id_range):
    q = torch.randn(n, d, dtype=torch.float64)
    keys = torch.randn(m, d, dtype=torch.float64)
    alpha = 5.0 / q.norm(dim=1)
    beta = 1.0 / keys.norm(dim=1)
    # ids in [-1, id_range): several keys share an id, -1 matches nothing.
    row_ids = torch.randint(-1, id_range, (n,))
    col_ids = torch.randint(-1, id_range, (m,))
    return q, keys, alpha, beta, row_ids, col_ids


def _ref_scores(q, keys, alpha, beta, row_ids, col_ids, exclude_diag):
    s = alpha[:, None] * beta[None, :] * (q @ keys.T)
    mask = (row_ids[:, None] == col_ids[None, :]) & (row_ids[:, None] >= 0)
    if exclude_diag:
        mask |= torch.eye(q.shape[0], keys.shape[0], dtype=torch.bool)
    return s.masked_fill(mask, float("-inf"))


def _probs(s, lse, dim):
    lse = lse.unsqueeze(dim)
    return torch.where(torch.isneginf(lse), torch.zeros_like(s), torch.exp(s - lse))


def _ref_grads(s, q, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad):
    ds = row_grad[:, None] * _probs(s, row_lse, 1)
    if col_lse is not None:
        ds = ds + col_grad[None, :] * _probs(s, col_lse, 0)
    h = ds * alpha[:, None] * beta[None, :]
    return h @ keys, h.T @ q


def _cast(ts, dtype):
    return [t.to(dtype) if t.is_floating_point() else t for t in ts]


def _close(actual, expected, dtype):
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    actual = actual.double()
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual)), "masked / empty rows differ"
    scale = expected[finite].abs().max().clamp_min(1.0) if finite.any() else 1.0
    err = (actual[finite] - expected[finite]).abs().max() if finite.any() else 0.0
    assert err <= tol * scale, f"max error {float(err):.3g} > {tol} x {float(scale):.3g}"


@pytest.mark.parametrize("exclude_diag", [False, True], ids=["ids", "ids+diag"])
@pytest.mark.parametrize("id_range", [2, 50], ids=["dense", "sparse"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_forward_and_backward_with_id_mask(backend, shape, id_range, exclude_diag):
    ops, dtype = _ops(backend), _dtype(backend)
    q, keys, alpha, beta, row_ids, col_ids = _problem(*shape, id_range)
    s = _ref_scores(q, keys, alpha, beta, row_ids, col_ids, exclude_diag)
    ref_row, ref_col = torch.logsumexp(s, 1), torch.logsumexp(s, 0)
    args = _cast((q, keys, alpha, beta), dtype)
    ids = dict(row_ids=row_ids, col_ids=col_ids, exclude_diag=exclude_diag)

    row_lse, col_lse = ops.masked_lse_forward(*args, with_col_lse=True, **ids)
    _close(row_lse, ref_row, dtype)
    _close(col_lse, ref_col, dtype)

    # Upstream gradients; a global lse larger than the kernel's own (merged extra candidates).
    g_row, g_col = torch.rand(shape[0], dtype=torch.float64), torch.rand(shape[1], dtype=torch.float64)
    global_row = torch.logaddexp(ref_row, torch.randn(shape[0], dtype=torch.float64))
    dq_ref, dk_ref = _ref_grads(s, q, keys, alpha, beta, global_row, g_row, ref_col, g_col)
    dq, dk = ops.masked_lse_backward(*args, *_cast((global_row, g_row, ref_col, g_col), dtype), **ids)
    _close(dq, dq_ref, dtype)
    _close(dk, dk_ref, dtype)

    if hasattr(ops, "masked_lse_forward_with_grad"):
        extra = torch.randn(shape[0], dtype=torch.float64)
        lse_ref = torch.logaddexp(ref_row, extra)
        dq_ref, dk_ref = _ref_grads(s, q, keys, alpha, beta, lse_ref, g_row, None, None)
        lse, dq, dk = ops.masked_lse_forward_with_grad(
            *args, g_row.to(dtype), extra_lse=extra.to(dtype), **ids)
        _close(lse, lse_ref, dtype)
        _close(dq, dq_ref, dtype)
        _close(dk, dk_ref, dtype)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_every_entry_masked_gives_neg_inf_and_zero_gradient(backend):
    ops, dtype = _ops(backend), _dtype(backend)
    q, keys, alpha, beta, _, _ = _problem(4, 6, 8, 1)
    row_ids, col_ids = torch.zeros(4, dtype=torch.int64), torch.zeros(6, dtype=torch.int64)
    args = _cast((q, keys, alpha, beta), dtype)
    row_lse, _ = ops.masked_lse_forward(*args, row_ids=row_ids, col_ids=col_ids)
    assert torch.isneginf(row_lse).all()
    dq, dk = ops.masked_lse_backward(*args, row_lse, torch.ones(4, dtype=dtype), row_ids=row_ids,
                                     col_ids=col_ids)
    assert torch.equal(dq, torch.zeros_like(dq)) and torch.equal(dk, torch.zeros_like(dk))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_ids_must_come_in_pairs_with_the_right_shape(backend):
    ops, dtype = _ops(backend), _dtype(backend)
    q, keys, alpha, beta, row_ids, col_ids = _problem(5, 7, 3, 3)
    args = _cast((q, keys, alpha, beta), dtype)
    with pytest.raises((ValueError, RuntimeError), match="row_ids and col_ids"):
        ops.masked_lse_forward(*args, row_ids=row_ids)
    with pytest.raises((ValueError, RuntimeError), match="col_ids"):
        ops.masked_lse_forward(*args, row_ids=row_ids, col_ids=col_ids[:3])
    with pytest.raises((TypeError, RuntimeError), match="row_ids"):
        ops.masked_lse_forward(*args, row_ids=row_ids.int(), col_ids=col_ids)
