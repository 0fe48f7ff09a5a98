"""pytest-benchmark suite over the same cases as ``fastcontrast bench`` (benchmarks/families.py):
every family x implementation, forward+backward, on CPU (fp32):

    pytest benchmarks/test_bench_families.py --benchmark-json=OUT.json      # N = 2048 and 8192
    pytest benchmarks/ -m "not slow"                                      # N = 2048 only

Each case's loss is first checked against fastcontrast's reference (float64, same inputs) with the
tolerance of the bench (a mismatch fails the test instead of being timed); a missing peer or
backend is skipped with its reason. extra_info: family, implementation, shape, essential FLOP,
products run and achieved GFLOP/s. Memory is not measured here (one process for all cases):
`fastcontrast bench` measures it, per case in a fresh process.
"""
import pytest
import torch

from . import _bootstrap

_bootstrap.ensure_package()
from fastcontrast.cli.measure import cpu_model  # noqa: E402
from fastcontrast.benchmarks import families as fam  # noqa: E402
from fastcontrast.benchmarks.runner import reference_value  # noqa: E402
from fastcontrast.benchmarks.worker import check_loss, make_step  # noqa: E402

DIM = 256
SIZES = [2048, pytest.param(8192, marks=pytest.mark.slow)]
CASES = [(family, impl) for family in ("infonce", "clip", "ntxent", "supcon", "moco", "siglip")
         for impl in fam.FAMILIES[family].implementations
         if impl not in ("torch.compile", "fastcontrast[triton]")]


@pytest.mark.parametrize("family_name,impl_name", CASES,
                         ids=[f"{f}-{i.replace(' ', '_')}" for f, i in CASES])
@pytest.mark.parametrize("n", SIZES)
def test_forward_backward(benchmark, family_name, impl_name, n):
    family = fam.FAMILIES[family_name]
    impl = family.implementations[impl_name]
    loss_fn, reason = fam.build(family, impl, "cpu")
    if reason is not None:
        pytest.skip(reason)
    problem = fam.Problem(n=256 if family_name == "moco" else n, d=128 if family_name == "moco"
                          else DIM, k=n * 8 if family_name == "moco" else 0)
    inputs = family.make_inputs(problem)
    step = make_step(loss_fn, inputs)
    check = check_loss(float(step().detach()), reference_value(family, problem), problem.dtype)
    assert check["status"] == "ok", check
    benchmark.group = f"{family_name} fwd+bwd N={problem.n} D={problem.d}" + \
        (f" K={problem.k}" if problem.k else "")
    flop = fam.essential_flop(family, problem)
    run = flop // family.essential_products * fam.products_run(family, impl)
    benchmark.extra_info.update(family=family_name, provider=impl_name, n=problem.n,
                                m=family.columns(problem), d=problem.d, flop_essential=flop,
                                products=fam.products_run(family, impl), cpu=cpu_model(),
                                threads=torch.get_num_threads(), torch=torch.__version__)
    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops_at_median"] = run / stats.median / 1e9
