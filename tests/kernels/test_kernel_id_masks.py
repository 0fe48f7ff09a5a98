"""The id mask of the masked-LSE kernels across each backend's own tiling: entry (i, j) is
excluded where row_ids[i] == col_ids[j] >= 0 (on top of the diagonal mask). This removes the
positive from the denominator (DCL) and same-instance negatives from a queue (MoCo with stored
indices). The C++ kernels look the ids of each row block up once (several blocks here:
block_rows), the Triton kernels load them per program (several programs: small blocks), the
torch backend per chunk. The contract itself, on the default tiling and on every dtype, is
tests/kernels/test_masked_lse_contract.py; both compare with the oracle of tests/_helpers.py."""
import pytest
import torch

from fastcontrast import _ext, _torch_chunked, backends

from .._helpers import (KERNEL_TOLERANCES, assert_close, device_for,
                       masked_lse_oracle)

# (N, M, D): more keys than queries; more queries, over 3 x 3 tiles of 16 and 2 chunks of D.
SHAPES = [(9, 13, 5), (40, 33, 20)]
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")


@pytest.fixture(autouse=True)
def _poisoned_outputs(configure):
    configure(poison_outputs=True)


def _tiled(name, configure):
    """(the backend's kernels, keyword arguments for tiles of 16 rows, dtype)."""
    if name not in backends.available_backends(device_for(name)):
        pytest.skip(f"backend {name!r} cannot run here")
    if name == "torch":
        configure(torch_chunk_elements=256)  # 256 // M rows
        return _torch_chunked, {}, torch.float64
    if name == "cpu":
        return _ext.load_extension(), dict(block_rows=16), torch.float64
    from fastcontrast.kernels import infonce

    return infonce, dict(blocks=(16, 16, 16)), torch.float32


def _problem(n, m, d, id_range, dtype, device):
    q = torch.randn(n, d, dtype=torch.float64)
    keys = torch.randn(m, d, dtype=torch.float64)
    alpha, beta = 5.0 / q.norm(dim=1), 1.0 / keys.norm(dim=1)
    # ids in [-1, id_range): several keys share an id, -1 matches nothing.
    ids = (torch.randint(-1, id_range, (n,)).to(device), torch.randint(-1, id_range, (m,)).to(
        device))
    return [t.to(device=device, dtype=dtype) for t in (q, keys, alpha, beta)], ids


def _close(actual, expected, dtype, name, gradient=False):
    assert_close(actual, expected, dtype, name, floor=0.0 if gradient else 1.0,
                 tolerances=KERNEL_TOLERANCES)


@pytest.mark.parametrize("exclude_diag", [False, True], ids=["ids", "ids+diag"])
@pytest.mark.parametrize("id_range", [2, 50], ids=["dense", "sparse"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend", list(backends.PROPERTIES))
def test_id_mask_across_tiles(backend, shape, id_range, exclude_diag, configure):
    ops, tiles, dtype = _tiled(backend, configure)
    n, m, _ = shape
    (q, keys, alpha, beta), (row_ids, col_ids) = _problem(*shape, id_range, dtype,
                                                           device_for(backend))
    mask = dict(row_ids=row_ids, col_ids=col_ids, exclude_diag=exclude_diag)
    own = masked_lse_oracle(q, keys, alpha, beta, **mask)
    row_lse, col_lse = ops.masked_lse_forward(q, keys, alpha, beta, with_col_lse=True, **mask,
                                              **tiles)
    _close(row_lse, own.row_lse, dtype, "row_lse")
    _close(col_lse, own.col_lse, dtype, "col_lse")

    # A global row lse larger than the kernel's own (merged extra candidates), column terms.
    g_row = torch.rand(n, dtype=dtype, device=q.device)
    g_col = torch.rand(m, dtype=dtype, device=q.device)
    extra = torch.randn(n, dtype=torch.float64)
    global_row = torch.logaddexp(own.row_lse, extra).to(device=q.device, dtype=dtype)
    col = own.col_lse.to(device=q.device, dtype=dtype)
    dq, dk = ops.masked_lse_backward(q, keys, alpha, beta, global_row, g_row, col, g_col, **mask,
                                     **tiles)
    truth = masked_lse_oracle(q, keys, alpha, beta, row_lse=global_row, row_grad=g_row,
                              col_lse=col, col_grad=g_col, **mask)
    _close(dq, truth.dq, dtype, "dq", gradient=True)
    _close(dk, truth.dkeys, dtype, "dkeys", gradient=True)

    if backends.PROPERTIES[backend].fuses_gradient:
        extra = extra.to(device=q.device, dtype=dtype)
        lse, dq, dk = ops.masked_lse_forward_with_grad(q, keys, alpha, beta, g_row,
                                                       extra_lse=extra, **mask, **tiles)
        truth = masked_lse_oracle(q, keys, alpha, beta, row_grad=g_row, extra_lse=extra, **mask)
        _close(lse, truth.row_lse, dtype, "fused row_lse")
        _close(dq, truth.dq, dtype, "fused dq", gradient=True)
        _close(dk, truth.dkeys, dtype, "fused dkeys", gradient=True)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_ids_must_come_in_pairs_with_the_right_shape(backend):
    """The kernels check the id arguments the ops pass them (both or neither, (N,) / (M,),
    int64) and name the argument."""
    if backend not in backends.available_backends(device_for(backend)):
        pytest.skip(f"backend {backend!r} cannot run here")
    dtype = torch.float32
    (q, keys, alpha, beta), (row_ids, col_ids) = _problem(5, 7, 3, 3, dtype, device_for(backend))
    op = torch.ops.fastcontrast.masked_lse_forward
    with pytest.raises((ValueError, RuntimeError), match="row_ids and col_ids"):
        op(q, keys, alpha, beta, row_ids, None, False, 0, False, backend)
    with pytest.raises((ValueError, RuntimeError), match="col_ids"):
        op(q, keys, alpha, beta, row_ids, col_ids[:3], False, 0, False, backend)
    with pytest.raises((TypeError, RuntimeError), match="row_ids"):
        op(q, keys, alpha, beta, row_ids.int(), col_ids, False, 0, False, backend)
