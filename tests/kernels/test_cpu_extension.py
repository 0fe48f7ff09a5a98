"""What is specific to the C++ CPU kernels (csrc/cpu/infonce.cpp, through the module that
fastcontrast._ext loads): the build and the fallback, the multi-block paths (block_rows smaller
than N), inputs that require grad, and the TORCH_CHECK argument errors. The masked-LSE contract
on the default blocks is tests/kernels/test_masked_lse_contract.py; both use the float64
oracle and the closeness check of tests/_helpers.py (float32: within 3x PyTorch's own float32
error too)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from fastcontrast import _config, _ext

from .._helpers import KERNEL_TOLERANCES, assert_close, masked_lse_oracle

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (N, M, D) over several blocks of 16 rows: partial last blocks, N < M and N > M.
SHAPES = [(37, 130, 3), (300, 257, 67)]
MASKS = [(False, 0), (True, 0), (True, 3), (True, -2)]  # (exclude_diag, diag_offset)
DTYPES = [torch.float32, torch.float64]
BLOCK_ROWS = 16


def _compiler_present():
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    return compiler is not None and shutil.which("ninja") is not None


def test_extension_builds_where_a_compiler_exists():
    if not _compiler_present():
        pytest.skip("no C++ compiler or ninja on PATH: the fallback is the expected behaviour")
    if _config.settings().disable_extension:
        pytest.skip("FASTCONTRAST_DISABLE_EXTENSION=1")
    assert _ext.available(), "a compiler and ninja are present but the extension did not build"


@pytest.fixture
def ext(configure):
    """The compiled module, its outputs NaN-poisoned (an element never written fails)."""
    if not _ext.available():
        pytest.skip("fastcontrast C++ extension unavailable (see the warning for why)")
    configure(poison_outputs=True)
    return _ext.load_extension()


def make_problem(n, m, d, dtype, *, inv_tau=10.0):
    """Raw q / keys with alpha_i = inv_tau / ||q_i||, beta_j = 1 / ||k_j|| (fused normalisation)."""
    q, keys = torch.randn(n, d, dtype=torch.float64), torch.randn(m, d, dtype=torch.float64)
    alpha, beta = inv_tau / q.norm(dim=1), 1.0 / keys.norm(dim=1)
    return [t.to(dtype) for t in (q, keys, alpha, beta)]


def _check(actual, name, dtype, oracle_args, field, gradient=False):
    """``field`` of the output against the float64 oracle, float32 also against PyTorch's own
    float32 error (the same formula in float32 sees the same GEMM rounding)."""
    truth = getattr(masked_lse_oracle(**oracle_args), field)
    base = None
    if dtype == torch.float32:
        base = getattr(masked_lse_oracle(**oracle_args, dtype=torch.float32), field)
    assert actual.dtype == dtype, f"{name}: dtype {actual.dtype}"
    assert_close(
        actual,
        truth,
        dtype,
        name,
        floor=0.0 if gradient else 1.0,
        baseline=base,
        tolerances=KERNEL_TOLERANCES,
    )


@pytest.mark.parametrize("exclude_diag,diag_offset", MASKS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_forward_over_blocks(ext, n, m, d, dtype, exclude_diag, diag_offset):
    q, keys, alpha, beta = make_problem(n, m, d, dtype)
    mask = dict(exclude_diag=exclude_diag, diag_offset=diag_offset)
    row, col = ext.masked_lse_forward(
        q, keys, alpha, beta, with_col_lse=True, block_rows=BLOCK_ROWS, **mask
    )
    args = dict(q=q, keys=keys, alpha=alpha, beta=beta, **mask)
    _check(row, "row_lse", dtype, args, "row_lse")
    _check(col, "col_lse", dtype, args, "col_lse")
    row_only, none = ext.masked_lse_forward(q, keys, alpha, beta, block_rows=BLOCK_ROWS, **mask)
    assert none is None
    _check(row_only, "row_lse without col_lse", dtype, args, "row_lse")


@pytest.mark.parametrize("with_col", [False, True])
@pytest.mark.parametrize("exclude_diag,diag_offset", MASKS[:3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_backward_over_blocks(ext, n, m, d, dtype, exclude_diag, diag_offset, with_col):
    q, keys, alpha, beta = make_problem(n, m, d, dtype)
    mask = dict(exclude_diag=exclude_diag, diag_offset=diag_offset)
    own = masked_lse_oracle(q, keys, alpha, beta, **mask)
    # A global row lse, larger than this kernel's own (merged with other candidates).
    row_lse = torch.logaddexp(own.row_lse, torch.randn(n, dtype=torch.float64)).to(dtype)
    row_grad = torch.randn(n, dtype=torch.float64).to(dtype)  # negative and non-uniform
    col_lse = own.col_lse.to(dtype) if with_col else None
    col_grad = torch.randn(m, dtype=torch.float64).to(dtype) if with_col else None
    dq, dkeys = ext.masked_lse_backward(
        q, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad, block_rows=BLOCK_ROWS, **mask
    )
    args = dict(
        q=q,
        keys=keys,
        alpha=alpha,
        beta=beta,
        row_lse=row_lse,
        row_grad=row_grad,
        col_lse=col_lse,
        col_grad=col_grad,
        **mask,
    )
    _check(dq, "dq", dtype, args, "dq", gradient=True)
    _check(dkeys, "dkeys", dtype, args, "dkeys", gradient=True)


@pytest.mark.parametrize("with_extra", [False, True])
@pytest.mark.parametrize("exclude_diag,diag_offset", MASKS[:3])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m,d", SHAPES)
def test_forward_with_grad_over_blocks(ext, n, m, d, dtype, exclude_diag, diag_offset, with_extra):
    q, keys, alpha, beta = make_problem(n, m, d, dtype)
    row_grad = torch.randn(n, dtype=torch.float64).to(dtype)
    extra = None
    if with_extra:
        extra = torch.randn(n, dtype=torch.float64) * 3
        extra[::3] = float("-inf")
        extra = extra.to(dtype)
    mask = dict(exclude_diag=exclude_diag, diag_offset=diag_offset)
    row_lse, dq, dkeys = ext.masked_lse_forward_with_grad(
        q, keys, alpha, beta, row_grad, extra_lse=extra, block_rows=BLOCK_ROWS, **mask
    )
    args = dict(q=q, keys=keys, alpha=alpha, beta=beta, row_grad=row_grad, extra_lse=extra, **mask)
    _check(row_lse, "row_lse", dtype, args, "row_lse")
    _check(dq, "dq", dtype, args, "dq", gradient=True)
    _check(dkeys, "dkeys", dtype, args, "dkeys", gradient=True)


@pytest.mark.parametrize("need_dq,need_dkeys", [(True, False), (False, True), (False, False)])
def test_need_flags_over_blocks(ext, need_dq, need_dkeys):
    """The module returns None for an output not needed (the op turns it into (0,))."""
    q, keys, alpha, beta = make_problem(33, 40, 16, torch.float64)
    row_grad = torch.randn(33, dtype=torch.float64)
    own = masked_lse_oracle(q, keys, alpha, beta, exclude_diag=True)
    flags = dict(need_dq=need_dq, need_dkeys=need_dkeys, block_rows=8, exclude_diag=True)
    args = dict(
        q=q,
        keys=keys,
        alpha=alpha,
        beta=beta,
        row_lse=own.row_lse,
        row_grad=row_grad,
        exclude_diag=True,
    )
    backward = ext.masked_lse_backward(q, keys, alpha, beta, own.row_lse, row_grad, **flags)
    lse, *fused = ext.masked_lse_forward_with_grad(q, keys, alpha, beta, row_grad, **flags)
    _check(lse, "fused row_lse", torch.float64, args, "row_lse")
    for got, name in zip(list(backward) + fused, ("dq", "dkeys") * 2):
        if need_dq if name == "dq" else need_dkeys:
            _check(got, name, torch.float64, args, name, gradient=True)
        else:
            assert got is None, f"{name}: {got}"


def test_inputs_that_require_grad_are_accepted(ext):
    """The out= GEMMs run under a no-grad guard: inputs that require grad are fine."""
    q, keys, alpha, beta = make_problem(20, 30, 8, torch.float32)
    q.requires_grad_()
    keys.requires_grad_()
    row_grad = torch.ones(20)
    lse, dq, dkeys = ext.masked_lse_forward_with_grad(q, keys, alpha, beta, row_grad)
    assert not (lse.requires_grad or dq.requires_grad or dkeys.requires_grad)
    args = dict(q=q, keys=keys, alpha=alpha, beta=beta, row_grad=row_grad)
    _check(lse, "row_lse", torch.float32, args, "row_lse")
    _check(dq, "dq", torch.float32, args, "dq", gradient=True)
    _check(dkeys, "dkeys", torch.float32, args, "dkeys", gradient=True)


# ---------------------------------------------------------------------------------------------
# Argument checks: TORCH_CHECK errors that name the argument


@pytest.mark.parametrize(
    "case,needle",
    [
        ("keys_dtype", "keys must have dtype"),
        ("q_int", "q must have dtype float32 or float64"),
        ("q_1d", "q must be 2-D"),
        ("feature_dim", "keys must have shape (M, D) with D = 8"),
        ("alpha_shape", "alpha must have shape [6], got [5]"),
        ("beta_dtype", "beta must have dtype"),
        ("q_strided", "q must be contiguous"),
        ("q_meta", "q must be a CPU tensor"),
    ],
)
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
        ext.masked_lse_forward(q, keys, alpha, beta)
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
hints = [w for w in caught if "pip install --no-build-isolation ." in str(w.message)]
print("RESULT", first is None, second is None, avail, len(hints))
from fastcontrast import backends
print("AUTO", backends.resolve("auto", "cpu"), backends.resolve("auto", "cpu", family="momentum"),
      "cpu" in backends.available_backends("cpu"))
"""


def test_disabled_extension_falls_back_with_one_warning():
    """Without the extension: None, one warning with the fix, and "auto" resolves to torch."""
    env = dict(os.environ, FASTCONTRAST_DISABLE_EXTENSION="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, "-c", _FALLBACK_SCRIPT],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    if "IMPORT-FAILED" in proc.stdout:
        pytest.skip(f"fastcontrast does not import right now: {proc.stdout.strip()}")
    assert "RESULT True True False 1" in proc.stdout, proc.stdout + proc.stderr
    assert "AUTO torch torch False" in proc.stdout, proc.stdout  # auto: the torch backend
