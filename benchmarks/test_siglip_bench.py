"""pytest-benchmark suite: SigLIP forward+backward, fastcontrast's backends against OpenCLIP's
materialised formula and its chunked-autograd variant (CPU, fp32; see _siglip_cases.py).

    pytest benchmarks/test_siglip_bench.py                    # N = 4096 and 8192
    pytest benchmarks/test_siglip_bench.py -m "not slow"      # N = 4096 only

Each record's extra_info holds the implementation, shape, essential FLOP (6 N^2 D) and the
achieved GFLOP/s at the median.
"""
import pytest
import torch

import fastcontrast
from fastcontrast.cli.measure import cpu_model

try:
    from ._siglip_cases import forward_backward, loss_function, make_inputs, siglip_flop
except ImportError:  # this folder on sys.path, not imported as a package
    from _siglip_cases import forward_backward, loss_function, make_inputs, siglip_flop

DIM = 256
SIZES = [4096, pytest.param(8192, marks=pytest.mark.slow)]
ROUNDS = {4096: 5, 8192: 3}
CPU_CASES = ["fastcontrast[cpu]", "fastcontrast[torch]", "materialised", "chunked autograd"]


@pytest.mark.parametrize("impl", CPU_CASES)
@pytest.mark.parametrize("n", SIZES)
def test_siglip_forward_backward(benchmark, n, impl):
    if impl == "fastcontrast[cpu]" and "cpu" not in fastcontrast.available_backends("cpu"):
        pytest.skip("C++ extension unavailable here")
    inputs = make_inputs(n, DIM)
    fn = loss_function(impl)
    flop = siglip_flop(n, DIM)
    benchmark.group = f"siglip fwd+bwd N={n} D={DIM}"
    benchmark.extra_info.update(provider=impl, n=n, d=DIM, flop=flop, dtype="fp32",
                                cpu=cpu_model(), threads=torch.get_num_threads(),
                                torch=torch.__version__)
    benchmark.pedantic(lambda: forward_backward(fn, inputs), rounds=ROUNDS[n], iterations=1,
                       warmup_rounds=1)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gflops_at_median"] = flop / stats.median / 1e9
