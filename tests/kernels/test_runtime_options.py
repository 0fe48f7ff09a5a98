"""The process-wide switches of the C++ CPU kernels (csrc/cpu/runtime_options.h), set through
fastcontrast._C.set_runtime_options instead of environment variables read at every call."""
import math

import pytest
import torch

import fastcontrast._ext as ext_loader

from .._helpers import backend_usable

pytestmark = pytest.mark.skipif(not backend_usable("cpu"), reason="C++ extension unavailable")


@pytest.fixture
def ext():
    module = ext_loader.load_extension()
    previous = module.get_runtime_options()
    yield module
    module.set_runtime_options(*previous)


def test_set_and_get_round_trip(ext):
    for shared_shift in (False, True):
        for poison_outputs in (False, True):
            ext.set_runtime_options(shared_shift=shared_shift, poison_outputs=poison_outputs)
            assert ext.get_runtime_options() == (shared_shift, poison_outputs)


def _problem(n=97, m=89, d=5):
    gen = torch.Generator().manual_seed(5)
    q, k = torch.randn(n, d, generator=gen), torch.randn(m, d, generator=gen)
    return q, k, torch.full((n,), 2.0), torch.rand(m, generator=gen) + 0.5


def test_shared_shift_switch_selects_the_passes(ext):
    """Both sets of passes give the same log-sum-exps up to rounding, and differ in their bits
    (one exp per entry with one shift for all, or a max pass and a per-row shift): the switch
    does reach the kernels."""
    q, k, alpha, beta = _problem()
    expected = torch.logsumexp((q @ k.T).double() * alpha.double()[:, None] * beta.double(), 1)
    rows = {}
    for shared_shift in (True, False):
        ext.set_runtime_options(shared_shift=shared_shift, poison_outputs=False)
        rows[shared_shift], _ = ext.masked_lse_forward(q, k, alpha, beta, block_rows=32)
        torch.testing.assert_close(rows[shared_shift].double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(rows[True], rows[False])


def test_poisoned_outputs_are_nan_before_the_kernel_writes_them(ext):
    """With poison_outputs the kernels' outputs start as NaN (an element never written stays
    NaN); every element here is written, so the results are unchanged and finite."""
    q, k, alpha, beta = _problem()
    g = torch.rand(q.shape[0])
    results = {}
    for poison in (False, True):
        ext.set_runtime_options(shared_shift=True, poison_outputs=poison)
        row, col = ext.masked_lse_forward(q, k, alpha, beta, with_col_lse=True, block_rows=32)
        grads = ext.masked_lse_backward(q, k, alpha, beta, row, g, col, g[:k.shape[0]],
                                        block_rows=32)
        results[poison] = [row, col, *grads]
    for a, b in zip(results[False], results[True]):
        assert torch.equal(a, b) and bool(torch.isfinite(b).all())
    assert not math.isnan(float(results[True][0][0]))
