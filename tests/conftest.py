"""Test set-up: fixed seeds per test, and Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is imported, so it is
set here, at collection time, before the tests import fastcontrast.kernels."""
import contextlib
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


@pytest.fixture(autouse=True)
def _seed(request):
    """A different, reproducible seed per test; set FASTCONTRAST_TEST_SEED for fresh inputs."""
    base = int(os.environ.get("FASTCONTRAST_TEST_SEED", "0"))
    seed = (zlib.crc32(request.node.nodeid.encode()) + base) % (2**31)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def configure():
    """configure(name=value, ...): fastcontrast's settings (fastcontrast/_config.py) changed for
    the rest of the test."""
    from fastcontrast import _config

    with contextlib.ExitStack() as stack:
        def apply(**changes):
            stack.enter_context(_config.override(**changes))
        yield apply


# The fast tier (``scripts/test.sh --fast``, i.e. ``pytest -m "not slow"``): every loss, kernel
# op, queue and momentum update on every backend that runs on this CPU, against the float64
# reference, in a few minutes. Marked slow, and left to the full run: the exhaustive kernel
# contract and compile checks, torch.compile, the property-based search, the benchmark harness,
# multi-process (distributed) runs, the reference methods' training, and the Triton kernels'
# own contract tests and large shapes in Triton's interpreter (seconds per case; the triton
# backend of every loss stays in this tier on small shapes).
SLOW_PATHS = (
    "tests/bench/", "tests/distributed/", "tests/methods/",
    "tests/compat/test_open_clip_distributed.py", "tests/compat/test_lightly_distributed.py",
    "tests/compat/test_open_clip_distill_distributed.py",
    "tests/kernels/test_triton_compile.py", "tests/kernels/test_triton_gram_compile.py",
    "tests/kernels/test_triton_compile_objectives.py",
    "tests/kernels/test_triton_compile_updates.py",
    "tests/kernels/test_masked_lse_contract.py", "tests/kernels/test_gram_kernels.py",
    "tests/kernels/test_cuda_sources.py", "tests/losses/contract/test_compile.py",
    "tests/losses/contract/test_compile_shapes.py", "tests/losses/contract/test_properties.py",
    "tests/kernels/test_triton_infonce_kernels.py",
)
# (file, parameter text): the Triton-interpreter cases of a file that are slow.
SLOW_TRITON_CASES = (
    ("tests/losses/test_info_nce.py::", "-257-1000-"),
    ("tests/losses/test_siglip.py::", "-257-1000-"),
    ("tests/moco/test_queue_aliasing.py::", "[triton]"),
)


def _slow(nodeid):
    return nodeid.startswith(SLOW_PATHS) or any(
        nodeid.startswith(path) and "triton" in nodeid and part in nodeid
        for path, part in SLOW_TRITON_CASES)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _slow(item.nodeid):
            item.add_marker(pytest.mark.slow)
