"""The C++ CPU kernels (csrc/cpu/infonce.cpp through fastcontrast._ext) against a plain float64
PyTorch formula: materialised scores, -inf masks, logsumexp, and the dS formula of the contract.

Errors are measured relative to the reference's magnitude. In float32 a kernel must be within
max(FP32_TOL, 2 x the error of the same formula run by PyTorch in float32): both see the same
float32 GEMM rounding, so this is tight without being flaky."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastcontrast import _ext

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FP32_TOL = 1e-5
FP64_TOL = 1e-12
SHAPES = [(1, 1, 3), (7, 5, 64), (257, 300, 3), (64, 64, 1000), (300, 257, 130)]
MASKS = [(False, 0), (True, 0), (True, 3), (True, -2)]  # (exclude_diag, diag_offset)
DTYPES = [torch.float32, torch.float64]


def _compiler_present():
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    return compiler is not None and shutil.which("ninja") is not None


def test_extension_builds_where_a_compiler_exists():
    if not _compiler_present():
        pytest.skip("no C++ compiler or ninja on PATH: the fallback is the expected behaviour")
    if os.environ.get("FASTCONTRAST_DISABLE_EXTENSION") == "1":
        pytest.skip("FASTCONTRAST_DISABLE_EXTENSION=1")
    assert _ext.available(), "a compiler and ninja are present but the extension did not build"


@pytest.fixture(scope="module")
def ext():
    if not _ext.available():
        pytest.skip("fastcontrast C++ extension unavailable (see the warning for why)")
    return _ext


# ---------------------------------------------------------------------------------------------
# The reference, in float64 (or float32 to measure PyTorch's own float32 error).

def make_problem(n, m, d, dtype, *, inv_tau=10.0, scale=1.0):
    """Raw q / keys with alpha_i = inv_tau / ||q_i||, beta_j = 1 / ||k_j|| (fused normalisation)."""
    q = torch.randn(n, d, dtype=torch.float64) * scale
    keys = torch.randn(m, d, dtype=torch.float64) * scale
    alpha = inv_tau / q.norm(dim=1)
    beta = 1.0 / keys.norm(dim=1)
    return [t.to(dtype) for t in (q, keys, alpha, beta)]


def ref_scores(q, keys, alpha, beta, exclude_diag, diag_offset):
    s = alpha[:, None] * beta[None, :] * (q @ keys.T)
    if exclude_diag:
        i = torch.arange(q.shape[0])
        j = i + diag_offset
        keep = (j >= 0) & (j < keys.shape[0])
        s[i[keep], j[keep]] = float("-inf")
    return s


def ref_lse(q, keys, alpha, beta, exclude_diag=False, diag_offset=0):
    s = ref_scores(q, keys, alpha, beta, exclude_diag, diag_offset)
    return torch.logsumexp(s, dim=1), torch.logsumexp(s, dim=0)


def _probs(s, lse, dim):
    """exp(s - lse) along ``dim``, 0 where lse = -inf (no candidate)."""
    lse = lse.unsqueeze(dim)
    return torch.where(torch.isneginf(lse), torch.zeros_like(s), torch.exp(s - lse))


def ref_grads(q, keys, alpha, beta, row_lse, row_grad, col_lse=None, col_grad=None,
              exclude_diag=False, diag_offset=0):
    s = ref_scores(q, keys, alpha, beta, exclude_diag, diag_offset)
    ds = row_grad[:, None] * _probs(s, row_lse, 1)
    if col_lse is not None:
        ds = ds + col_grad[None, :] * _probs(s, col_lse, 0)
    dq = alpha[:, None] * (ds @ (beta[:, None] * keys))
    dkeys = beta[:, None] * (ds.T @ (alpha[:, None] * q))
    return dq, dkeys


def rel_err(actual, expected, name):
    """max |actual - expected| / max |expected|, with -inf required at the same places."""
    actual, expected = actual.to(torch.float64), expected.to(torch.float64)
    assert actual.shape == expected.shape, \
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    ninf_a, ninf_e = torch.isneginf(actual), torch.isneginf(expected)
    assert torch.equal(ninf_a, ninf_e), (
        f"{name}: -inf at {ninf_a.nonzero().flatten().tolist()[:10]}, expected at "
        f"{ninf_e.nonzero().flatten().tolist()[:10]}")
    finite = ~ninf_e
    assert torch.isfinite(actual[finite]).all(), f"{name}: non-finite values {actual[finite]}"
    if not finite.any():
        return 0.0
    diff = (actual[finite] - expected[finite]).abs()
    return float(diff.max()) / max(1e-300, float(expected[finite].abs().max()))


def check(actual, truth, name, dtype, torch32=None):
    """Relative error within the dtype's tolerance (float32: or 2x PyTorch's float32 error)."""
    err = rel_err(actual, truth, name)
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    if torch32 is not None:
        tol = max(tol, 2.0 * rel_err(torch32, truth, name + " (torch float32)"))
    if err > tol:
        diff = (actual.double() - truth).abs()
        where = tuple(int(k) for k in torch.nonzero(diff == diff[torch.isfinite(diff)].max())[0])
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol:.3g}; worst at {where}: "
                             f"{float(actual[where]):.10g} vs {float(truth[where]):.10g}")


def f64(*tensors):
    return [None if t is None else t.to(torch.float64) for t in tensors]


def reference_pair(fn, dtype, *tensors, **kwargs):
    """(float64 truth, the same formula in float32 or None)."""
    truth = fn(*f64(*tensors), **kwargs)
    if dtype != torch.float32:
        return truth, None
    return truth, fn(*[None if t is None else t.to(torch.float32) for t in tensors], **kwargs)


# ---------------------------------------------------------------------------------------------
# masked_lse_forward

@pytest.mark.parametrize("block_rows", [0, 16])
@pytest.mark.parametrize("exclude_diag,diag_offset", MASKS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_forward(ext, n, m, d, dtype, exclude_diag, diag_offset, block_rows):
    q, keys, alpha, beta = make_problem(n, m, d, dtype)
    row, col = ext.masked_lse_forward(q, keys, alpha, beta, exclude_diag=exclude_diag,
                                      diag_offset=diag_offset, with_col_lse=True,
                                      block_rows=block_rows)
    assert row.dtype == dtype and col.dtype == dtype
    truth, t32 = reference_pair(ref_lse, dtype, q, keys, alpha, beta, exclude_diag=exclude_diag,
                                diag_offset=diag_offset)
    check(row, truth[0], "row_lse", dtype, t32 and t32[0])
    check(col, truth[1], "col_lse", dtype, t32 and t32[1])
    row_only, none = ext.masked_lse_forward(q, keys, alpha, beta, exclude_diag=exclude_diag,
                                            diag_offset=diag_offset, block_rows=block_rows)
    assert none is None
    check(row_only, truth[0], "row_lse without col_lse", dtype, t32 and t32[0])


# ---------------------------------------------------------------------------------------------
# masked_lse_backward

@pytest.mark.parametrize("with_col", [False, True])
@pytest.mark.parametrize("block_rows", [0, 16])
@pytest.mark.parametrize("exclude_diag,diag_offset", MASKS[:3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_backward(ext, n, m, d, dtype, exclude_diag, diag_offset, block_rows, with_col):
    q, keys, alpha, beta = make_problem(n, m, d, dtype)
    row_lse, col_lse = ref_lse(*f64(q, keys, alpha, beta), exclude_diag, diag_offset)
    # A global row lse, larger than this kernel's own (merged with other candidates).
    row_lse = torch.logaddexp(row_lse, torch.randn(n, dtype=torch.float64))
    row_grad = torch.randn(n, dtype=torch.float64)  # negative and non-uniform
    col_grad = torch.randn(m, dtype=torch.float64) if with_col else None
    col_lse = col_lse if with_col else None
    lse_args = [None if t is None else t.to(dtype) for t in (row_lse, row_grad, col_lse, col_grad)]
    dq, dkeys = ext.masked_lse_backward(q, keys, alpha, beta, *lse_args, exclude_diag=exclude_diag,
                                        diag_offset=diag_offset, block_rows=block_rows)
    truth, t32 = reference_pair(ref_grads, dtype, q, keys, alpha, beta, *lse_args,
                                exclude_diag=exclude_diag, diag_offset=diag_offset)
    check(dq, truth[0], "dq", dtype, t32 and t32[0])
    check(dkeys, truth[1], "dkeys", dtype, t32 and t32[1])


@pytest.mark.parametrize("need_dq,need_dkeys", [(True, False), (False, True), (False, False)])
def test_backward_need_flags(ext, need_dq, need_dkeys):
    q, keys, alpha, beta = make_problem(33, 40, 16, torch.float64)
    row_lse, _ = ref_lse(q, keys, alpha, beta, True, 0)
    row_grad = torch.randn(33, dtype=torch.float64)
    dq, dkeys = ext.masked_lse_backward(q, keys, alpha, beta, row_lse, row_grad, exclude_diag=True,
                                        need_dq=need_dq, need_dkeys=need_dkeys, block_rows=8)
    ref_dq, ref_dkeys = ref_grads(q, keys, alpha, beta, row_lse, row_grad, exclude_diag=True)
    assert (dq is None) != need_dq and (dkeys is None) != need_dkeys
    if need_dq:
        check(dq, ref_dq, "dq", torch.float64)
    if need_dkeys:
        check(dkeys, ref_dkeys, "dkeys", torch.float64)


def test_backward_minus_inf_lse_contributes_zero(ext):
    """A row / column with no candidate (lse = -inf) gives zero gradient, never NaN."""
    q, keys, alpha, beta = make_problem(1, 1, 3, torch.float32)
    neg_inf = torch.full((1,), float("-inf"))
    ones = torch.ones(1)
    dq, dkeys = ext.masked_lse_backward(q, keys, alpha, beta, neg_inf, ones, neg_inf, ones,
                                        exclude_diag=True)
    assert torch.equal(dq, torch.zeros_like(q)) and torch.equal(dkeys, torch.zeros_like(keys))
    # Unmasked but lse = -inf: still 0 by contract.
    dq, dkeys = ext.masked_lse_backward(q, keys, alpha, beta, neg_inf, ones, neg_inf, ones)
    assert torch.equal(dq, torch.zeros_like(q)) and torch.equal(dkeys, torch.zeros_like(keys))


# ---------------------------------------------------------------------------------------------
# masked_lse_forward_with_grad

@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("block_rows", [0, 16])
@pytest.mark.parametrize("exclude_diag,diag_offset", MASKS[:3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_forward_with_grad(ext, n, m, d, dtype, exclude_diag, diag_offset, block_rows, with_extra):
    q, keys, alpha, beta = make_problem(n, m, d, dtype)
    row_grad = torch.randn(n, dtype=torch.float64).to(dtype)
    extra = None
    if with_extra:
        extra = torch.randn(n, dtype=torch.float64) * 3
        extra[::3] = float("-inf")
        extra = extra.to(dtype)
    row_lse, dq, dkeys = ext.masked_lse_forward_with_grad(
        q, keys, alpha, beta, row_grad, exclude_diag=exclude_diag, diag_offset=diag_offset,
        extra_lse=extra, block_rows=block_rows)

    def ref(q, keys, alpha, beta, row_grad, extra):
        lse, _ = ref_lse(q, keys, alpha, beta, exclude_diag, diag_offset)
        if extra is not None:
            lse = torch.logaddexp(lse, extra)
        return (lse,) + ref_grads(q, keys, alpha, beta, lse, row_grad,
                                  exclude_diag=exclude_diag, diag_offset=diag_offset)

    truth, t32 = reference_pair(ref, dtype, q, keys, alpha, beta, row_grad, extra)
    for got, name, k in ((row_lse, "row_lse", 0), (dq, "dq", 1), (dkeys, "dkeys", 2)):
        assert got.dtype == dtype
        check(got, truth[k], name, dtype, t32 and t32[k])


@pytest.mark.parametrize("need_dq,need_dkeys", [(True, False), (False, True), (False, False)])
def test_forward_with_grad_need_flags(ext, need_dq, need_dkeys):
    q, keys, alpha, beta = make_problem(33, 40, 16, torch.float64)
    row_grad = torch.randn(33, dtype=torch.float64)
    lse, dq, dkeys = ext.masked_lse_forward_with_grad(q, keys, alpha, beta, row_grad,
                                                      need_dq=need_dq, need_dkeys=need_dkeys,
                                                      block_rows=8)
    ref_row, _ = ref_lse(q, keys, alpha, beta, False, 0)
    ref_dq, ref_dkeys = ref_grads(q, keys, alpha, beta, ref_row, row_grad)
    check(lse, ref_row, "row_lse", torch.float64)
    assert (dq is None) != need_dq and (dkeys is None) != need_dkeys
    if need_dq:
        check(dq, ref_dq, "dq", torch.float64)
    if need_dkeys:
        check(dkeys, ref_dkeys, "dkeys", torch.float64)


def test_forward_with_grad_no_candidates(ext):
    """All-masked rows: lse = extra_lse (or -inf) and zero gradient, never NaN."""
    q, keys, alpha, beta = make_problem(1, 1, 3, torch.float32)
    for extra, expected in ((None, float("-inf")), (torch.tensor([float("-inf")]), float("-inf")),
                            (torch.tensor([-2.5]), -2.5), (torch.tensor([-1e4]), -1e4)):
        lse, dq, dkeys = ext.masked_lse_forward_with_grad(q, keys, alpha, beta, torch.ones(1),
                                                          exclude_diag=True, extra_lse=extra)
        assert float(lse) == expected
        assert torch.equal(dq, torch.zeros_like(q)) and torch.equal(dkeys, torch.zeros_like(keys))


def test_contract_matches_autograd(ext):
    """The contract's dS formula is the gradient of sum_i g_i row_lse_i + sum_j c_j col_lse_j."""
    q, keys, alpha, beta = make_problem(45, 38, 20, torch.float64)
    row_grad, col_grad = torch.randn(45, dtype=torch.float64), torch.randn(38, dtype=torch.float64)
    qa, ka = q.clone().requires_grad_(), keys.clone().requires_grad_()
    a, b = 10.0 / qa.norm(dim=1).detach(), 1.0 / ka.norm(dim=1).detach()  # scales held constant
    row_lse, col_lse = ref_lse(qa, ka, a, b, True, 1)
    ((row_grad * row_lse).sum() + (col_grad * col_lse).sum()).backward()
    dq, dkeys = ext.masked_lse_backward(q, keys, alpha, beta, row_lse.detach(), row_grad,
                                        col_lse.detach(), col_grad, exclude_diag=True,
                                        diag_offset=1, block_rows=16)
    check(dq, qa.grad, "dq", torch.float64)
    check(dkeys, ka.grad, "dkeys", torch.float64)


# ---------------------------------------------------------------------------------------------
# Numerics at extreme scales

@pytest.mark.parametrize("inv_tau", [100.0, 1e4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_scores_do_not_overflow(ext, dtype, inv_tau):
    """Scores up to |s| ~ 1e4 (tiny temperature on large-norm inputs): finite and correct."""
    n, m, d = 96, 80, 32
    q, keys, alpha, beta = make_problem(n, m, d, dtype, inv_tau=inv_tau, scale=50.0)
    row_grad = torch.randn(n, dtype=torch.float64).to(dtype)
    col_grad = torch.randn(m, dtype=torch.float64).to(dtype)
    row, col = ext.masked_lse_forward(q, keys, alpha, beta, exclude_diag=True, with_col_lse=True,
                                      block_rows=32)
    lse, dq, dkeys = ext.masked_lse_forward_with_grad(q, keys, alpha, beta, row_grad,
                                                      exclude_diag=True, block_rows=32)
    bq, bk = ext.masked_lse_backward(q, keys, alpha, beta, row, row_grad, col, col_grad,
                                     exclude_diag=True, block_rows=32)
    for t in (row, col, lse, dq, dkeys, bq, bk):
        assert torch.isfinite(t).all()
    args64 = f64(q, keys, alpha, beta)
    ref_row, ref_col = ref_lse(*args64, True, 0)
    ref_dq, ref_dk = ref_grads(*args64, ref_row, row_grad.double(), exclude_diag=True)
    ref_bq, ref_bk = ref_grads(*args64, ref_row, row_grad.double(), ref_col, col_grad.double(),
                               exclude_diag=True)
    # float32 scores carry an absolute error ~ |s| * 1e-7, which the softmax turns into a relative
    # error of the probabilities: the tolerance scales with the score magnitude.
    tol = 1e-12 * inv_tau if dtype == torch.float64 else 2e-6 * inv_tau
    for got, truth, name in ((row, ref_row, "row_lse"), (col, ref_col, "col_lse"),
                             (lse, ref_row, "lse"), (dq, ref_dq, "dq"), (dkeys, ref_dk, "dkeys"),
                             (bq, ref_bq, "bwd dq"), (bk, ref_bk, "bwd dkeys")):
        err = rel_err(got, truth, name)
        assert err <= tol, f"{name}: relative error {err:.3g} > {tol:.3g}"


def test_inputs_that_require_grad_are_accepted(ext):
    q, keys, alpha, beta = make_problem(20, 30, 8, torch.float32)
    q.requires_grad_()
    keys.requires_grad_()
    lse, dq, dkeys = ext.masked_lse_forward_with_grad(q, keys, alpha, beta, torch.ones(20))
    assert not dq.requires_grad and torch.isfinite(dkeys).all()


def test_empty_keys(ext):
    q, keys, alpha, beta = make_problem(5, 0, 4, torch.float32)
    row, col = ext.masked_lse_forward(q, keys, alpha, beta, with_col_lse=True)
    assert torch.isneginf(row).all() and col.shape == (0,)
    lse, dq, dkeys = ext.masked_lse_forward_with_grad(q, keys, alpha, beta, torch.ones(5))
    assert torch.isneginf(lse).all() and torch.equal(dq, torch.zeros_like(q))
    assert dkeys.shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Argument checks: TORCH_CHECK errors that name the argument

def _raw_module():
    module = _ext.load_extension()
    assert module is not None
    return module


@pytest.mark.parametrize("case,needle", [
    ("keys_dtype", "keys must have dtype"),
    ("q_int", "q must have dtype float32 or float64"),
    ("q_1d", "q must be 2-D"),
    ("feature_dim", "keys must have shape (M, D) with D = 8"),
    ("alpha_shape", "alpha must have shape [6], got [5]"),
    ("beta_dtype", "beta must have dtype"),
    ("q_strided", "q must be contiguous"),
    ("q_meta", "q must be a CPU tensor"),
])
def test_forward_argument_errors(ext, case, needle):
    q, keys, alpha, beta = make_problem(6, 7, 8, torch.float32)
    if case == "keys_dtype":
        keys = keys.double()
    elif case == "q_int":
        q = q.to(torch.int32)
    elif case == "q_1d":
        q = q.flatten()
    elif case == "feature_dim":
        keys = keys[:, :5].contiguous()
    elif case == "alpha_shape":
        alpha = alpha[:5]
    elif case == "beta_dtype":
        beta = beta.double()
    elif case == "q_strided":
        q = torch.randn(8, 6).t()
    elif case == "q_meta":
        q = q.to("meta")
    with pytest.raises(RuntimeError) as info:
        _raw_module().masked_lse_forward(q, keys, alpha, beta)
    assert needle in str(info.value)


def test_backward_and_fused_argument_errors(ext):
    q, keys, alpha, beta = make_problem(6, 7, 8, torch.float32)
    lse, grad = torch.zeros(6), torch.ones(6)
    with pytest.raises(RuntimeError, match="row_lse must have shape"):
        ext.masked_lse_backward(q, keys, alpha, beta, torch.zeros(7), grad)
    with pytest.raises(RuntimeError, match="row_grad must have dtype"):
        ext.masked_lse_backward(q, keys, alpha, beta, lse, grad.double())
    with pytest.raises(RuntimeError, match="col_lse and col_grad must be given together"):
        ext.masked_lse_backward(q, keys, alpha, beta, lse, grad, col_lse=torch.zeros(7))
    with pytest.raises(RuntimeError, match="col_grad must have shape"):
        ext.masked_lse_backward(q, keys, alpha, beta, lse, grad, torch.zeros(7), torch.zeros(6))
    with pytest.raises(RuntimeError, match="extra_lse must have shape"):
        ext.masked_lse_forward_with_grad(q, keys, alpha, beta, grad, extra_lse=torch.zeros(7))
    with pytest.raises(RuntimeError, match="row_grad must have shape"):
        ext.masked_lse_forward_with_grad(q, keys, alpha, beta, torch.ones(7))


def test_python_wrappers_accept_non_contiguous_inputs(ext):
    q, keys, alpha, beta = make_problem(6, 7, 8, torch.float64)
    row, _ = ext.masked_lse_forward(q.t().contiguous().t(), keys, alpha, beta)
    check(row, ref_lse(q, keys, alpha, beta, False, 0)[0], "row_lse", torch.float64)


# ---------------------------------------------------------------------------------------------
# The fallback (a subprocess, so that the cached module of this process is left alone)

_FALLBACK_SCRIPT = """
import warnings
try:
    from fastcontrast import _ext
except Exception as error:
    print("IMPORT-FAILED", type(error).__name__, error)
    raise SystemExit(0)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    first, second, avail = _ext.load_extension(), _ext.load_extension(), _ext.available()
hints = [w for w in caught if "pip install --no-build-isolation -e ." in str(w.message)]
print("RESULT", first is None, second is None, avail, len(hints))
"""


def test_disabled_extension_falls_back_with_one_warning():
    env = dict(os.environ, FASTCONTRAST_DISABLE_EXTENSION="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, "-c", _FALLBACK_SCRIPT], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if "IMPORT-FAILED" in proc.stdout:
        pytest.skip(f"fastcontrast does not import right now: {proc.stdout.strip()}")
    assert "RESULT True True False 1" in proc.stdout, proc.stdout + proc.stderr
