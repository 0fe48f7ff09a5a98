"""pytest-benchmark suite: InfoNCE forward+backward, fastcontrast vs naive PyTorch, and the
torch.mm floor (CPU, fp32). Not part of the default test run (testpaths is tests/):

    pytest benchmarks/ --benchmark-json=benchmarks/results/<name>/bench.json   # everything
    pytest benchmarks/ -m "not slow"                  # skip the N = 16384 cases (minutes each)

Each record's extra_info holds the provider, backend, shape, FLOP and the achieved GFLOP/s.
"""
import pytest
import torch

from . import _bootstrap

_bootstrap.ensure_package()
from fastcontrast.cli.measure import cpu_model  # noqa: E402
from fastcontrast.benchmarks._cases import (CASES, DTYPE, case_step, concrete_backend,  # noqa: E402
                                            info_nce_flop, make_inputs)
from fastcontrast.benchmarks._floor import (FLOOR_SHAPE, ORIENTATIONS, matmul_flop,  # noqa: E402
                                            matmul_steps)

DIM = 256
SIZES = [4096, pytest.param(16384, marks=pytest.mark.slow)]
ROUNDS = {4096: 5, 16384: 3}


def _annotate(benchmark, flop, **info):
    benchmark.extra_info.update(flop=flop, dtype=DTYPE, cpu=cpu_model(),
                                threads=torch.get_num_threads(), torch=torch.__version__, **info)


def _record_rate(benchmark, flop):
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops_at_median"] = flop / stats.median / 1e9


@pytest.mark.parametrize("case", list(CASES), ids=lambda case: case.replace(" ", "-"))
@pytest.mark.parametrize("n", SIZES)
def test_info_nce_forward_backward(benchmark, n, case):
    query, key = make_inputs(n, DIM)
    step = case_step(case, query, key, backend="auto")
    symmetric = CASES[case][1]
    flop = info_nce_flop(n, n, DIM)
    benchmark.group = f"info_nce fwd+bwd N=M={n} D={DIM}{' symmetric' if symmetric else ''}"
    _annotate(benchmark, flop, provider=case, backend=concrete_backend("auto"), n=n, m=n, d=DIM,
              symmetric=symmetric)
    benchmark.pedantic(step, rounds=ROUNDS[n], iterations=1, warmup_rounds=1)
    _record_rate(benchmark, flop)


@pytest.fixture(scope="module")
def floor_steps():
    return matmul_steps(*FLOOR_SHAPE)


@pytest.mark.parametrize("orientation", ORIENTATIONS)
def test_matmul_floor(benchmark, floor_steps, orientation):
    rows, keys, dim = FLOOR_SHAPE
    flop = matmul_flop(rows, keys, dim)
    benchmark.group = f"torch.mm floor {rows} x {keys} x {dim}"
    _annotate(benchmark, flop, provider=f"torch.mm {orientation}", rows=rows, keys=keys, d=dim)
    benchmark.pedantic(floor_steps[orientation], rounds=10, iterations=1, warmup_rounds=1)
    _record_rate(benchmark, flop)
