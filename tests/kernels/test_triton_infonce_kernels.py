"""Tests of the Triton masked log-sum-exp kernels (kernels/infonce.py) against float64 PyTorch,
and of every Triton host function with poisoned outputs (last section).

The oracle below materialises the (N, M) score matrix in float64 from the very same (already
rounded) inputs, so the tolerances measure only the kernels' own arithmetic: fp32 accumulation,
and for fp16/bf16 the rounding of the gradient tile to the input dtype before the second product.
Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET),
so shapes stay small; odd sizes exercise every masked edge (D = 3, D = 1000, N = 1, M = 1)."""
import math

import pytest
import torch

pytest.importorskip("triton")

from fastcontrast.kernels import _common  # noqa: E402 (after the skip: needs triton)
from fastcontrast.kernels import infonce as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INF = float("inf")

# log2(0) of a row without candidates is a legitimate -inf; numpy (the interpreter) warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")


# Per-dtype (rtol, atol): |out - ref| <= atol * scale + rtol * |ref|, where scale = max |ref| for
# gradients and max(1, max |ref|) for lse values (their rounding error follows the O(1) scores).
# fp32 is exact up to fp32 rounding (GPU: torch's "highest" matmul precision means no tf32);
# fp16/bf16 gradients round the dS tile to the input dtype before the second product.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
DTYPES = list(TOL)
SHAPES = [(1, 1, 3), (7, 5, 64), (33, 70, 3), (64, 64, 130), (100, 37, 1000)]
# (exclude_diag, diag_offset): none, the plain diagonal, and shifted diagonals either way.
MASKS = [(False, 0), (True, 0), (True, 3), (True, -2)]
# Small blocks: several row and key programs (the column lock and staggered start, partial last
# blocks) and D split into chunks (the accumulate-in-place path of the backward kernel).
SMALL_BLOCKS = [(16, 16, 16), (32, 16, 32)]


def mask_id(mask):
    return f"diag{mask[1]}" if mask[0] else "nodiag"


def shape_id(shape):
    return "x".join(map(str, shape))


# ------------------------------------------------------------------------------------------------
# float64 oracle
# ------------------------------------------------------------------------------------------------

def ref_scores(q, keys, alpha, beta, exclude_diag, diag_offset):
    """(N, M) float64 scores, masked entries -inf."""
    s = alpha.double()[:, None] * beta.double()[None, :] * (q.double() @ keys.double().T)
    if exclude_diag:
        i = torch.arange(q.shape[0], device=q.device)[:, None]
        j = torch.arange(keys.shape[0], device=q.device)[None, :]
        s = s.masked_fill(j == i + diag_offset, -INF)
    return s


def ref_probs(s, lse, dim):
    """exp(s - lse) along `dim`, 0 where lse is -inf (no candidate) or s is masked."""
    lse = lse.double().unsqueeze(dim)
    return torch.where(torch.isfinite(lse), torch.exp(s - lse), torch.zeros_like(s))


def ref_backward(q, keys, alpha, beta, s, row_lse, row_grad, col_lse=None, col_grad=None):
    ds = row_grad.double()[:, None] * ref_probs(s, row_lse, 1)
    if col_lse is not None:
        ds = ds + col_grad.double()[None, :] * ref_probs(s, col_lse, 0)
    ds = ds.masked_fill(s == -INF, 0.0)
    a, b = alpha.double(), beta.double()
    dq = a[:, None] * ((ds * b[None, :]) @ keys.double())
    dkeys = b[:, None] * ((ds.T * a[None, :]) @ q.double())
    return dq, dkeys


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def assert_close(name, out, ref, tol, floor=0.0):
    """Every element: same -inf pattern as ref, finite elsewhere, within tolerance; verbose on
    failure."""
    assert out is not None, f"{name}: got None"
    assert out.dtype == torch.float32, f"{name}: dtype {out.dtype}, expected float32"
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    out64, ref = out.double().cpu(), ref.double().cpu()
    neg_inf = ref == -INF
    assert torch.equal(out64 == -INF, neg_inf), (
        f"{name}: -inf at {(out64 == -INF).nonzero().tolist()}, expected at "
        f"{neg_inf.nonzero().tolist()}")
    finite_ref = ref[~neg_inf]
    finite_out = out64[~neg_inf]
    assert torch.isfinite(finite_ref).all(), f"{name}: the reference itself is not finite"
    bad_values = ~torch.isfinite(finite_out)
    assert not bad_values.any(), (f"{name}: {int(bad_values.sum())} non-finite values (inf/NaN) "
                                  f"in the output")
    if finite_ref.numel() == 0:
        return
    rtol, atol = tol
    scale = max(floor, finite_ref.abs().max().item()) or 1.0
    err = (finite_out - finite_ref).abs()
    allowed = atol * scale + rtol * finite_ref.abs()
    if (err > allowed).any():
        k = int((err - allowed).argmax())
        idx = (~neg_inf).nonzero()[k].tolist()
        raise AssertionError(
            f"{name}: {int((err > allowed).sum())}/{err.numel()} elements out of tolerance "
            f"(rtol={rtol}, "
            f"atol={atol}*{scale:.3g}); worst at {idx}: got {finite_out[k].item():.8g}, "
            f"expected {finite_ref[k].item():.8g} (max abs err {err.max().item():.3g})")


def make_inputs(N, M, D, dtype, temperature=0.07, normalize=True):
    """L2-normalised q/keys (as the host passes them) with non-uniform alpha and beta around
    1/tau and 1."""
    q = torch.randn(N, D, device=DEVICE)
    keys = torch.randn(M, D, device=DEVICE)
    if normalize:
        q = torch.nn.functional.normalize(q, dim=1)
        keys = torch.nn.functional.normalize(keys, dim=1)
    alpha = (torch.rand(N, device=DEVICE) * 0.4 + 0.8) / temperature
    beta = torch.rand(M, device=DEVICE) * 0.4 + 0.8
    return q.to(dtype), keys.to(dtype), alpha, beta


def lse_pair(s):
    return torch.logsumexp(s, dim=1), torch.logsumexp(s, dim=0)


# ------------------------------------------------------------------------------------------------
# forward
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks", SMALL_BLOCKS, ids=str)
@pytest.mark.parametrize("mask", [(False, 0), (True, 0), (True, 5)], ids=mask_id)
@pytest.mark.parametrize("shape", [(33, 70, 3), (50, 47, 40), (70, 33, 100)],
                         ids=shape_id)
def test_forward_many_programs(shape, mask, blocks):
    """Several row programs merging into the same columns under the locks, D in several chunks."""
    N, M, D = shape
    q, keys, alpha, beta = make_inputs(N, M, D, torch.float32)
    row_lse, col_lse = K.masked_lse_forward(q, keys, alpha, beta, exclude_diag=mask[0],
                                            diag_offset=mask[1],
                                            with_col_lse=True, blocks=blocks)
    ref_row, ref_col = lse_pair(ref_scores(q, keys, alpha, beta, *mask))
    assert_close("row_lse", row_lse, ref_row, TOL[torch.float32], floor=1.0)
    assert_close("col_lse", col_lse, ref_col, TOL[torch.float32], floor=1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_large_scores_stay_finite(dtype):
    """Unnormalised inputs, |s| up to ~1e4 (tau = 0.01, norms ~ 10): no overflow, no NaN.

    fp32 scores of size 1e4 carry an absolute rounding error ~1e-3, so the tolerance is relative
    to the score range here, not to 1."""
    N, M, D = 40, 48, 96
    q = (torch.randn(N, D, device=DEVICE)).to(dtype)
    keys = (torch.randn(M, D, device=DEVICE)).to(dtype)
    alpha = torch.full((N,), 100.0, device=DEVICE)
    beta = torch.full((M,), 1.0, device=DEVICE)
    s = ref_scores(q, keys, alpha, beta, True, 0)
    assert s[torch.isfinite(s)].abs().max() > 2e3
    row_lse, col_lse = K.masked_lse_forward(q, keys, alpha, beta, exclude_diag=True,
                                            with_col_lse=True)
    ref_row, ref_col = lse_pair(s)
    assert_close("row_lse", row_lse, ref_row, (2e-6, 0.0), floor=1.0)
    assert_close("col_lse", col_lse, ref_col, (2e-6, 0.0), floor=1.0)


# ------------------------------------------------------------------------------------------------
# backward
# ------------------------------------------------------------------------------------------------

def _extra_mass(lse):
    """log of extra candidates' exp-mass: around the local lse (or ~3 where it is -inf)."""
    base = torch.where(torch.isfinite(lse), lse, torch.full_like(lse, 3.0))
    return base + 0.5 * torch.randn_like(lse)


def run_backward_case(shape, mask, with_col, dtype, *, blocks=None, global_lse=False,
                      need_dq=True, need_dkeys=True, tol=None, inputs=None):
    N, M, D = shape
    exclude_diag, diag_offset = mask
    q, keys, alpha, beta = inputs if inputs is not None else make_inputs(N, M, D, dtype)
    s = ref_scores(q, keys, alpha, beta, exclude_diag, diag_offset)
    ref_row, ref_col = lse_pair(s)
    if global_lse:
        # A global lse merged with candidates outside this call (other key blocks, extra negatives)
        # of comparable total weight: larger than the local one, and finite even where that is -inf.
        ref_row = torch.logaddexp(ref_row, _extra_mass(ref_row))
        ref_col = torch.logaddexp(ref_col, _extra_mass(ref_col))
    row_lse = ref_row.float()
    col_lse = ref_col.float() if with_col else None
    row_grad = torch.randn(N, device=DEVICE)  # non-uniform, both signs
    col_grad = torch.randn(M, device=DEVICE) * 0.5 if with_col else None
    dq, dkeys = K.masked_lse_backward(q, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad,
                                      exclude_diag=exclude_diag, diag_offset=diag_offset,
                                      need_dq=need_dq, need_dkeys=need_dkeys, blocks=blocks)
    # The oracle uses the lse the kernel was given (rounded to fp32), as the kernel's caller would.
    ref_dq, ref_dkeys = ref_backward(q, keys, alpha, beta, s, row_lse, row_grad, col_lse, col_grad)
    tol = tol or TOL[dtype]
    if need_dq:
        assert_close("dq", dq, ref_dq, tol)
    else:
        assert dq is None
    if need_dkeys:
        assert_close("dkeys", dkeys, ref_dkeys, tol)
    else:
        assert dkeys is None


@pytest.mark.parametrize("blocks", SMALL_BLOCKS, ids=str)
@pytest.mark.parametrize("with_col", [False, True], ids=["rows", "rows+cols"])
@pytest.mark.parametrize("mask", [(False, 0), (True, 0), (True, -3)], ids=mask_id)
@pytest.mark.parametrize("shape", [(33, 70, 3), (50, 47, 40)], ids=shape_id)
def test_backward_many_programs(shape, mask, with_col, blocks):
    """Several programs per direction; D = 40 over chunks of 16/32 accumulates dX in place."""
    run_backward_case(shape, mask, with_col, torch.float32, blocks=blocks)


@pytest.mark.parametrize("blocks", [None, (16, 16, 16)], ids=["default", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_backward_many_programs_low_precision(dtype, blocks):
    run_backward_case((45, 38, 72), (True, 1), True, dtype, blocks=blocks)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_large_norm_small_alpha(dtype):
    """Large-norm inputs with a small alpha (the host's unnormalised cosine form
    alpha = 1/(tau |q_i|), beta = 1/|k_j|): tile values ~1e3 scaled down, gradients of the right
    size, all finite."""
    N, M, D = 37, 29, 64
    q = torch.randn(N, D, device=DEVICE) * 300.0
    keys = torch.randn(M, D, device=DEVICE) * 300.0
    q, keys = q.to(dtype), keys.to(dtype)
    alpha = 1.0 / (0.05 * q.float().norm(dim=1))
    beta = 1.0 / keys.float().norm(dim=1)
    run_backward_case((N, M, D), (False, 0), True, dtype, inputs=(q, keys, alpha, beta))


# ------------------------------------------------------------------------------------------------
# edge cases and validation
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("D", [40, 200])
def test_row_strided_views(D):
    """Rows of a wider matrix (row stride != D, last dimension contiguous) are read in place."""
    q_wide = torch.nn.functional.normalize(torch.randn(21, D + 7, device=DEVICE), dim=1)
    k_wide = torch.nn.functional.normalize(torch.randn(26, D + 3, device=DEVICE), dim=1)
    q, keys = q_wide[:, 2:D + 2], k_wide[:, :D]
    assert not q.is_contiguous() and q.stride(1) == 1
    alpha, beta = torch.full((21,), 1 / 0.1, device=DEVICE), torch.ones(26, device=DEVICE)
    row_lse, col_lse = K.masked_lse_forward(q, keys, alpha, beta, exclude_diag=True,
                                            with_col_lse=True)
    s = ref_scores(q, keys, alpha, beta, True, 0)
    ref_row, ref_col = lse_pair(s)
    assert_close("row_lse", row_lse, ref_row, TOL[torch.float32], floor=1.0)
    assert_close("col_lse", col_lse, ref_col, TOL[torch.float32], floor=1.0)
    run_backward_case((21, 26, D), (True, 0), True, torch.float32, inputs=(q, keys, alpha, beta))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=str)
def test_supported_dtypes_are_the_accepted_ones(dtype):
    """SUPPORTED_DTYPES (read by the host to pick the compute dtype) is what the kernels take:
    those dtypes match float64, any other is refused."""
    q, keys, alpha, beta = make_inputs(9, 11, 5, dtype)
    if dtype not in K.SUPPORTED_DTYPES:
        with pytest.raises(TypeError, match="dtype"):
            K.masked_lse_forward(q, keys, alpha, beta)
        return
    row_lse, _ = K.masked_lse_forward(q, keys, alpha, beta)
    assert_close("row_lse", row_lse, lse_pair(ref_scores(q, keys, alpha, beta, False, 0))[0],
                 TOL[dtype], floor=1.0)


def _valid(N=6, M=5, D=8):
    q, keys, alpha, beta = make_inputs(N, M, D, torch.float32)
    return dict(q=q, keys=keys, alpha=alpha, beta=beta)


@pytest.mark.parametrize("change, error, words", [
    (lambda a: a.update(q=a["q"].double(), keys=a["keys"].double()), TypeError, "float64"),
    (lambda a: a.update(keys=a["keys"].half()), TypeError, "keys"),
    (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError, "q"),
    (lambda a: a.update(q=a["q"][:, :7]), ValueError, "keys"),
    (lambda a: a.update(q=a["q"].reshape(-1)), ValueError, "2-D"),
    (lambda a: a.update(q=a["q"].T.contiguous().T), ValueError, "contiguous"),
    (lambda a: a.update(alpha=a["alpha"][:5]), ValueError, "alpha"),
    (lambda a: a.update(alpha=a["alpha"].double()), TypeError, "alpha"),
    (lambda a: a.update(beta=a["beta"][None]), ValueError, "beta"),
    (lambda a: a.update(beta=torch.ones(10, device=DEVICE)[::2]), ValueError, "contiguous"),
    (lambda a: a.update(beta=a["beta"].to("meta")), ValueError, "beta"),
    (lambda a: a.update(q=a["q"].to("meta"), keys=a["keys"].to("meta")), ValueError, "device"),
    (lambda a: a.update(keys=[[1.0] * 8] * 5), TypeError, "keys"),
])
def test_forward_validation(change, error, words):
    args = _valid()
    change(args)
    with pytest.raises(error, match=words):
        K.masked_lse_forward(args["q"], args["keys"], args["alpha"], args["beta"])


def test_backward_validation():
    a = _valid()
    q, keys, alpha, beta = a["q"], a["keys"], a["alpha"], a["beta"]
    lse, grad = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
    with pytest.raises(ValueError, match="col_lse and col_grad"):
        K.masked_lse_backward(q, keys, alpha, beta, lse, grad, torch.zeros(5, device=DEVICE), None)
    with pytest.raises(ValueError, match="row_lse"):
        K.masked_lse_backward(q, keys, alpha, beta, lse[:5], grad)
    with pytest.raises(TypeError, match="row_grad"):
        K.masked_lse_backward(q, keys, alpha, beta, lse, grad.half())
    with pytest.raises(ValueError, match="col_grad"):
        K.masked_lse_backward(q, keys, alpha, beta, lse, grad, torch.zeros(5, device=DEVICE),
                              torch.zeros(6, device=DEVICE))
    with pytest.raises(ValueError, match="blocks"):
        K.masked_lse_backward(q, keys, alpha, beta, lse, grad, blocks=(16, 24, 16))
    with pytest.raises(ValueError, match="blocks"):
        K.masked_lse_forward(q, keys, alpha, beta, blocks=(8, 16, 16))


# ------------------------------------------------------------------------------------------------
# Poisoned outputs: every Triton host function
# ------------------------------------------------------------------------------------------------
# With FASTCONTRAST_POISON_OUTPUTS=1 the host functions allocate their outputs filled with NaN
# (integers: -7) instead of torch.empty, so an element that no program writes (a partial last
# block, a D chunk, a skipped launch) fails the float64 comparison instead of passing by luck.

# (N, M, D): single rows, partial last blocks of rows and keys, D below one chunk and over several.
POISON_SHAPES = [(1, 1, 3), (37, 130, 67), (130, 37, 3), (1, 37, 67), (37, 1, 130)]
# Default blocks (D = 67, 130: one chunk or two) and small ones (several programs, D in chunks of
# 16: the accumulate-in-place path of the backward kernels).
POISON_BLOCKS = [None, (16, 16, 16)]


@pytest.fixture
def poisoned(configure):
    configure(poison_outputs=True)


def test_new_output_is_poisoned_only_when_asked(configure):
    configure(poison_outputs=False)
    assert _common.new_output((2, 3), torch.float32, DEVICE).shape == (2, 3)
    configure(poison_outputs=True)
    assert torch.isnan(_common.new_output((2, 3), torch.float32, DEVICE)).all()
    assert _common.new_output(4, torch.int64, DEVICE).tolist() == [_common.POISON_INT] * 4


@pytest.mark.parametrize("blocks", POISON_BLOCKS, ids=str)
@pytest.mark.parametrize("shape", POISON_SHAPES, ids=shape_id)
def test_masked_lse_poisoned_outputs(poisoned, shape, blocks):
    N, M, D = shape
    q, keys, alpha, beta = make_inputs(N, M, D, torch.float32)
    row_ids = torch.arange(N, device=DEVICE) % 5
    col_ids = torch.arange(M, device=DEVICE) % 7  # some pairs masked by ids
    masks = dict(exclude_diag=True, diag_offset=1, row_ids=row_ids, col_ids=col_ids)
    row_lse, col_lse = K.masked_lse_forward(q, keys, alpha, beta, with_col_lse=True,
                                            blocks=blocks, **masks)
    s = ref_scores(q, keys, alpha, beta, True, 1)
    s = s.masked_fill(row_ids[:, None] == col_ids[None, :], -INF)
    ref_row, ref_col = lse_pair(s)
    assert_close("row_lse", row_lse, ref_row, TOL[torch.float32], floor=1.0)
    assert_close("col_lse", col_lse, ref_col, TOL[torch.float32], floor=1.0)
    row_grad, col_grad = torch.randn(N, device=DEVICE), torch.randn(M, device=DEVICE)
    dq, dkeys = K.masked_lse_backward(q, keys, alpha, beta, ref_row.float(), row_grad,
                                      ref_col.float(), col_grad, blocks=blocks, **masks)
    ref_dq, ref_dkeys = ref_backward(q, keys, alpha, beta, s, ref_row.float(), row_grad,
                                     ref_col.float(), col_grad)
    assert_close("dq", dq, ref_dq, TOL[torch.float32])
    assert_close("dkeys", dkeys, ref_dkeys, TOL[torch.float32])


def ref_siglip(x, y, scale, bias, row_grad):
    """float64 (loss (N,), gx, gy, dz_total) of kernels/siglip.py's contract:
    z = scale <x_i, y_j> + bias, t = -y_ij z (y_ij = 1 iff i == j), loss_i = sum_j softplus(t),
    dz = -g_i y_ij sigmoid(t), gx = dz @ y, gy = dz^T @ x, dz_total = sum dz."""
    x, y, g = x.double(), y.double(), row_grad.double()
    labels = 2 * torch.eye(x.shape[0], y.shape[0], dtype=torch.float64, device=x.device) - 1
    t = -labels * (float(scale) * (x @ y.T) + float(bias))
    dz = -g[:, None] * labels * torch.sigmoid(t)
    return torch.nn.functional.softplus(t).sum(1), dz @ y, dz.T @ x, dz.sum()


@pytest.mark.parametrize("blocks", POISON_BLOCKS, ids=str)
@pytest.mark.parametrize("shape", POISON_SHAPES, ids=shape_id)
def test_siglip_poisoned_outputs(poisoned, shape, blocks):
    from fastcontrast.kernels import siglip

    N, M, D = shape
    x = torch.nn.functional.normalize(torch.randn(N, D, device=DEVICE), dim=1)
    y = torch.nn.functional.normalize(torch.randn(M, D, device=DEVICE), dim=1)
    scale, bias, row_grad = torch.tensor(10.0), torch.tensor(-10.0), torch.randn(N, device=DEVICE)
    ref_loss, ref_gx, ref_gy, ref_dz = ref_siglip(x, y, scale, bias, row_grad)
    tol = TOL[torch.float32]
    assert_close("loss", siglip.siglip_forward(x, y, scale, bias, blocks=blocks), ref_loss, tol)
    for need_gx, need_gy in ((True, True), (True, False), (False, True), (False, False)):
        gx, gy, dz_total = siglip.siglip_backward(x, y, scale, bias, row_grad, need_gx=need_gx,
                                                  need_gy=need_gy, blocks=blocks)
        assert (gx is not None, gy is not None) == (need_gx, need_gy)
        if need_gx:
            assert_close("gx", gx, ref_gx, tol)
        if need_gy:
            assert_close("gy", gy, ref_gy, tol)
        assert_close("dz_total", dz_total, ref_dz, tol)


@pytest.mark.parametrize("batch", [1, 37, 130])
def test_enqueue_writes_every_slot_it_owns(poisoned, batch):
    """enqueue_ writes into the caller's buffers (nothing to allocate): they start poisoned here,
    and every slot of the batch must hold its row afterwards, every other slot its poison."""
    from fastcontrast.kernels import queue

    size, D, pointer = 67, 3, 60
    keys = torch.randn(batch, D, device=DEVICE)
    labels = torch.arange(batch, device=DEVICE) + 100
    dst = torch.full((size, D), _common.POISON_FLOAT, device=DEVICE)
    dst_labels = torch.full((size,), _common.POISON_INT, device=DEVICE)
    pointer_buf = torch.zeros((), dtype=torch.int64, device=DEVICE)
    count_buf = torch.zeros((), dtype=torch.int64, device=DEVICE)
    new_pointer, new_count = queue.enqueue_(dst, keys, pointer, 5, pointer_buf, count_buf,
                                            dst_labels=dst_labels, labels=labels)
    ref = torch.full((size, D), math.nan, dtype=torch.float64, device=DEVICE)
    ref_labels = torch.full((size,), _common.POISON_INT, device=DEVICE)
    for b in range(batch):  # row b goes to slot (pointer + b) % size, later rows overwrite
        ref[(pointer + b) % size] = keys[b].double()
        ref_labels[(pointer + b) % size] = labels[b]
    assert torch.equal(torch.isnan(dst), torch.isnan(ref))
    assert torch.equal(dst.double()[~torch.isnan(ref)], ref[~torch.isnan(ref)])
    assert torch.equal(dst_labels, ref_labels)
    assert (new_pointer, new_count) == ((pointer + batch) % size, min(5 + batch, size))
    assert (int(pointer_buf), int(count_buf)) == (new_pointer, new_count)


def test_lerp_multi_tensor_poisoned(poisoned):
    """lerp_multi_tensor_ updates the caller's tensors in place (nothing to allocate): tensors of
    odd sizes, each element against float64 m * target + (1 - m) * online."""
    from fastcontrast.kernels import momentum

    shapes = [(1,), (37,), (130, 3), (67, 5)]
    targets = [torch.randn(s, device=DEVICE) for s in shapes]
    onlines = [torch.randn(s, device=DEVICE) for s in shapes]
    refs = [0.3 * t.double() + 0.7 * o.double() for t, o in zip(targets, onlines)]
    momentum.lerp_multi_tensor_(targets, onlines, 0.7)
    for i, (out, ref) in enumerate(zip(targets, refs)):
        assert_close(f"target {i}", out, ref, TOL[torch.float32])


@pytest.mark.parametrize("host", ["masked_lse_forward", "masked_lse_backward", "siglip_forward",
                                  "siglip_backward"])
def test_outputs_are_poisoned_before_the_launch(poisoned, monkeypatch, host):
    """With the kernels replaced by no-ops, every float output the host allocates stays NaN: the
    poisoned tests above would catch any element that no program writes."""
    from fastcontrast.kernels import siglip

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    for module in (K, siglip):
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            monkeypatch.setattr(module, name, NoLaunch())
    q, keys, alpha, beta = make_inputs(5, 7, 3, torch.float32)
    scale, bias = torch.tensor(1.0), torch.tensor(0.0)
    outputs = {
        "masked_lse_forward": lambda: K.masked_lse_forward(q, keys, alpha, beta)[:1],
        "masked_lse_backward": lambda: K.masked_lse_backward(q, keys, alpha, beta, alpha, alpha),
        "siglip_forward": lambda: (siglip.siglip_forward(q, keys, scale, bias),),
        "siglip_backward": lambda: siglip.siglip_backward(q, keys, scale, bias, alpha),
    }[host]()
    for out in outputs:
        assert torch.isnan(out).all(), out
