"""Test set-up: fixed seeds per test, and Triton's interpreter when there is no GPU.

TRITON_INTERPRET must be set before any module defining @triton.jit kernels is imported, so it is
set here, at collection time, before the tests import fastcontrast.kernels."""
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
