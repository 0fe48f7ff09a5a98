"""pytest-benchmark suite: momentum_update over ResNet-50's parameter list (161 tensors, 25.6M
elements, fp32) on CPU: fastcontrast's backends against torch._foreach_lerp_ and a Python loop of
lerp_. Not part of the default test run (testpaths is tests/):

    pytest benchmarks/test_momentum_bench.py --benchmark-json=OUT.json

Each record's extra_info holds the provider, the element count and the achieved GB/s (read
target + read online + write target, 12 bytes per fp32 element).
"""
import pytest
import torch

try:
    from ._momentum_cases import implementations, make_params, resnet50_param_shapes
except ImportError:  # this folder on sys.path, not imported as a package
    from _momentum_cases import implementations, make_params, resnet50_param_shapes
from fastcontrast.cli.measure import cpu_model
from fastcontrast.functional import available_backends

MOMENTUM = 0.999
BACKENDS = [b for b in ("cpu", "torch") if b in available_backends("cpu")]
PROVIDERS = ["python_loop_lerp_", "torch._foreach_lerp_"] + [f"fastcontrast[{b}]"
                                                            for b in BACKENDS + ["auto"]]


@pytest.fixture(scope="module")
def steps():
    shapes = resnet50_param_shapes()
    targets, onlines = make_params(shapes)
    numel = sum(t.numel() for t in targets)
    return implementations(targets, onlines, MOMENTUM, BACKENDS + ["auto"]), numel


@pytest.mark.parametrize("provider", PROVIDERS)
def test_momentum_update_resnet50(benchmark, steps, provider):
    implementations_, numel = steps
    moved = 12 * numel
    benchmark.group = f"momentum_update ResNet-50 params ({numel} fp32 elements, CPU)"
    benchmark.extra_info.update(provider=provider, numel=numel, bytes_moved=moved,
                                cpu=cpu_model(), threads=torch.get_num_threads(),
                                torch=torch.__version__)
    benchmark.pedantic(implementations_[provider], rounds=15, iterations=1, warmup_rounds=2)
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["gbps_at_median"] = moved / stats.median / 1e9
