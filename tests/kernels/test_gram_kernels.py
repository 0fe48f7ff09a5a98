"""The symmetric-Gram ops (gram_lse_forward / _backward, fastcontrast/infonce/ops.py) on every
backend that runs here, against the float64 contract of the full product on (z, z):

    row_lse = masked_lse_truth(z, z, alpha, beta).row_lse,   dz = dq + dkeys of that truth

Odd shapes (N = 1, 2, 257, D = 3), every dtype a backend computes in, forced small blocks (the
strip / tile boundaries), tiny temperatures and large norms, the masks the losses use (the
diagonal, ids of an involution, equal pair ids), NaN / inf inputs (exactly as the full-product
kernels: tests/kernels/test_nonfinite_kernels.py), and opcheck of both ops."""
import pytest
import torch

from fastcontrast import backends

from .._helpers import KERNEL_TOLERANCES, assert_close, device_for, masked_lse_truth

OPS = torch.ops.fastcontrast
CASES = [pytest.param(name, dtype, id=f"{name}-{str(dtype)[6:]}")
         for name, props in backends.PROPERTIES.items() for dtype in props.compute_dtypes]

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@pytest.fixture(autouse=True)
def _poisoned_outputs(configure):
    configure(poison_outputs=True)


def _skip_unavailable(backend, dtype=None, n=0):
    if backend not in backends.available_backends(device_for(backend)):
        pytest.skip(f"backend {backend!r} cannot run here")
    if backend == "triton" and device_for(backend) == "cpu" and n > 64:
        pytest.skip("the Triton interpreter is slow: N <= 64 there")


def _mask(kind, n, device):
    """(exclude_diag, row_ids, col_ids) of a symmetric mask."""
    if kind == "diag":
        return True, None, None
    idx = torch.arange(n, device=device)
    if kind == "involution":  # NT-Xent's positives: i <-> i + n/2 (the odd one out: itself)
        half = n // 2
        partner = torch.where(idx < 2 * half, (idx + half) % max(2 * half, 1), idx)
        return True, partner, idx
    return False, idx // 2, idx // 2  # "pairs": equal ids, the diagonal included


def _problem(backend, dtype, n, d, *, inv_tau=2.0, norm=1.0, normalize=True):
    """(z, alpha, beta) as the host passes them: inverse norms folded into the scales (alpha =
    inv_tau beta), or unit rows with alpha = inv_tau, beta = 1 for a prenormalising backend."""
    props = backends.PROPERTIES[backend]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.randn(n, d, dtype=torch.float64) * norm
    if normalize and props.prenormalized:
        z = torch.nn.functional.normalize(z, dim=1)
        beta = torch.ones(n, dtype=torch.float64)
    elif normalize:
        beta = 1.0 / z.norm(dim=1)
    else:
        beta = torch.ones(n, dtype=torch.float64)
    device = device_for(backend)
    z = z.to(dtype=dtype, device=device)
    return z, (inv_tau * beta).to(acc).to(device), beta.to(acc).to(device)


def _check(backend, dtype, z, alpha, beta, exclude_diag, row_ids, col_ids, *, max_logit=0.0):
    row_lse = OPS.gram_lse_forward(z, alpha, beta, row_ids, col_ids, exclude_diag, backend)
    mask = dict(exclude_diag=exclude_diag, row_ids=row_ids, col_ids=col_ids)
    truth = masked_lse_truth(z, z, alpha, beta, **mask)
    tol = dict(tolerances=KERNEL_TOLERANCES, max_logit=max_logit)
    assert_close(row_lse, truth.row_lse, dtype, "row_lse", **tol)
    grad = torch.rand(z.shape[0], dtype=alpha.dtype, device=alpha.device) - 0.3
    dz = OPS.gram_lse_backward(z, alpha, beta, row_lse, grad, row_ids, col_ids, exclude_diag,
                               backend)
    full = masked_lse_truth(z, z, alpha, beta, row_lse=truth.row_lse, row_grad=grad, **mask)
    assert_close(dz, full.dq + full.dkeys, dtype, "dz", **tol)


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("n,d", [(1, 3), (2, 3), (37, 3), (64, 16), (257, 3)])
@pytest.mark.parametrize("kind", ["diag", "involution", "pairs"])
@pytest.mark.parametrize("block", [0, 16])
def test_gram_ops_match_the_full_product(backend, dtype, n, d, kind, block, configure):
    _skip_unavailable(backend, dtype, n)
    configure(gram_block_rows=block)
    torch.manual_seed(n * 7 + d + block)
    z, alpha, beta = _problem(backend, dtype, n, d)
    _check(backend, dtype, z, alpha, beta, *_mask(kind, n, z.device))


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("kind", ["diag", "involution"])
def test_gram_ops_with_d_above_one_chunk(backend, dtype, kind):
    """D = 300: above one D chunk of every backend's tiles (the Triton interpreter's is 128), so
    the backward runs with D in chunks / splits, and the forward streams D."""
    _skip_unavailable(backend, dtype, 40)
    torch.manual_seed(300)
    z, alpha, beta = _problem(backend, dtype, 40, 300)
    _check(backend, dtype, z, alpha, beta, *_mask(kind, 40, z.device))


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("regime", ["tiny_temperature", "large_norms"])
def test_gram_ops_at_extreme_scales(backend, dtype, regime, configure):
    n = 48 if backend == "triton" else 97
    _skip_unavailable(backend, dtype, n)
    configure(gram_block_rows=16)
    torch.manual_seed(3)
    if regime == "tiny_temperature":  # 1/tau = 1e3 on unit rows: logits up to 1e3
        z, alpha, beta = _problem(backend, dtype, n, 8, inv_tau=1e3)
        max_logit = 1e3
    else:  # unnormalised rows of norm ~ 30: logits up to ~ 1e3
        z, alpha, beta = _problem(backend, dtype, n, 8, inv_tau=1.0, norm=10.0, normalize=False)
        max_logit = float((z.double() @ z.double().T).abs().max())
    _check(backend, dtype, z, alpha, beta, *_mask("involution", n, z.device),
           max_logit=max_logit)


def _assert_same_nonfinite(actual, expected, dtype, name):
    """NaN, +inf and -inf exactly where ``expected`` has them, close elsewhere."""
    actual = actual.detach().double().cpu()
    for pred in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(pred(actual), pred(expected)), (
            f"{name}: {pred.__name__} at {pred(actual).nonzero().tolist()[:8]}, expected at "
            f"{pred(expected).nonzero().tolist()[:8]}")
    finite = torch.isfinite(expected)
    rtol, atol = KERNEL_TOLERANCES[dtype]
    scale = float(expected[finite].abs().max()) if finite.any() else 1.0
    assert torch.allclose(actual[finite], expected[finite], rtol=rtol, atol=atol * max(scale, 1))


@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("kind", ["nan_row", "inf_entry", "nan_grad"])
@pytest.mark.parametrize("mask", ["diag", "involution"])
def test_gram_ops_nonfinite_as_the_full_product(backend, dtype, kind, mask, configure):
    n, d = 9, 4
    _skip_unavailable(backend, dtype, n)
    configure(gram_block_rows=16 if backend == "triton" else 2)
    torch.manual_seed(5)
    normalize = kind == "nan_row"
    z, alpha, beta = _problem(backend, dtype, n, d, normalize=normalize)
    if kind == "nan_row":
        z[4, 1] = float("nan")
        if backends.PROPERTIES[backend].prenormalized:
            z[4] = float("nan")
        else:
            beta[4] = alpha[4] = float("nan")
    elif kind == "inf_entry":
        z[2, 0] = float("inf")
    exclude_diag, row_ids, col_ids = _mask(mask, n, z.device)
    mask_args = dict(exclude_diag=exclude_diag, row_ids=row_ids, col_ids=col_ids)
    truth = masked_lse_truth(z, z, alpha, beta, **mask_args)
    row_lse = OPS.gram_lse_forward(z, alpha, beta, row_ids, col_ids, exclude_diag, backend)
    _assert_same_nonfinite(row_lse, truth.row_lse, dtype, "row_lse")
    grad = torch.rand(n, dtype=alpha.dtype, device=alpha.device) + 0.1
    lse = row_lse
    if kind == "nan_grad":
        grad[3] = float("nan")
    full = masked_lse_truth(z, z, alpha, beta, row_lse=lse, row_grad=grad, **mask_args)
    dz = OPS.gram_lse_backward(z, alpha, beta, lse, grad, row_ids, col_ids, exclude_diag,
                               backend)
    _assert_same_nonfinite(dz, full.dq + full.dkeys, dtype, "dz")


@pytest.mark.parametrize("backend", [b for b in backends.PROPERTIES])
def test_opcheck_gram_ops(backend):
    _skip_unavailable(backend)
    dtype = torch.float32 if backend == "triton" else torch.float64
    z, alpha, beta = _problem(backend, dtype, 7, 5)
    _, row_ids, col_ids = _mask("involution", 7, z.device)
    row_lse = OPS.gram_lse_forward(z, alpha, beta, row_ids, col_ids, True, backend)
    grad = torch.rand(7, dtype=alpha.dtype, device=alpha.device)
    torch.library.opcheck(OPS.gram_lse_forward, (z, alpha, beta, None, None, True, backend))
    torch.library.opcheck(OPS.gram_lse_forward, (z, alpha, beta, row_ids, col_ids, False,
                                                  backend))
    torch.library.opcheck(OPS.gram_lse_backward, (z, alpha, beta, row_lse, grad, row_ids,
                                                   col_ids, True, backend))


def test_cpu_gram_rejects_bad_arguments():
    _skip_unavailable("cpu")
    from fastcontrast import _ext

    ext = _ext.load_extension()
    z = torch.randn(5, 3, dtype=torch.float64)
    alpha = torch.ones(5, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="alpha must have dtype"):
        ext.gram_lse_forward(z, alpha.float(), alpha)
    with pytest.raises(RuntimeError, match="beta must have shape"):
        ext.gram_lse_forward(z, alpha, alpha[:4])
    with pytest.raises(RuntimeError, match="row_ids and col_ids must be given together"):
        ext.gram_lse_forward(z, alpha, alpha, row_ids=torch.arange(5))
    with pytest.raises(RuntimeError, match="row_grad must have shape"):
        ext.gram_lse_backward(z, alpha, alpha, alpha, alpha[:3])


@pytest.mark.parametrize("threads", [2, 3])
def test_cpu_gram_tiles_without_round_barriers_are_exact_and_deterministic(threads, configure):
    """The C++ pair tiles run on every thread at once with no barrier between rounds (pair_tasks,
    csrc/cpu/gram.cpp): 16-row blocks of 997 rows give 63 blocks (an odd count: rounds with a
    bye) and ~2000 tasks whose order of dependencies must hold. Against the float64 truth, and
    bitwise equal from call to call (each block's updates keep their order)."""
    _skip_unavailable("cpu")
    configure(gram_block_rows=16)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(997)
        z, alpha, beta = _problem("cpu", torch.float64, 997, 5)
        _check("cpu", torch.float64, z, alpha, beta, *_mask("involution", 997, z.device))
        grad = torch.rand(997, dtype=torch.float64) - 0.3
        runs = []
        for _ in range(3):
            lse = OPS.gram_lse_forward(z, alpha, beta, None, None, True, "cpu")
            runs.append((lse, OPS.gram_lse_backward(z, alpha, beta, lse, grad, None, None,
                                                    True, "cpu")))
    finally:
        torch.set_num_threads(previous)
    for lse, dz in runs[1:]:
        assert torch.equal(lse, runs[0][0]) and torch.equal(dz, runs[0][1])
