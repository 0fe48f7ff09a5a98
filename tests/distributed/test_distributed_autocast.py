"""The distributed losses under torch.autocast, as the single-process ones: a float32 value that
is not rounded to the autocast dtype (within 1e-5 relative of the float64 truth on the same
bfloat16 / float16 inputs), and the input dtype without autocast. One gloo process (W = 1, a
file rendezvous, a timeout on every collective): the cross-rank maths is tested elsewhere."""
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import fastcontrast as fc
from fastcontrast import distributed as fcd

N, D = 48, 16
LABELS = torch.arange(N) % 5
CASES = {  # name: (distributed call, single-process truth)
    "info_nce": lambda m, x, y: m.info_nce(x, y, temperature=0.07, backend="torch"),
    "clip_loss": lambda m, x, y: m.clip_loss(x, y, 30.0, backend="torch"),
    "nt_xent": lambda m, x, y: m.nt_xent(x, y, temperature=0.1, backend="torch"),
    "supcon": lambda m, x, y: m.supcon(x, LABELS, backend="torch"),
    "siglip_loss": lambda m, x, y: m.siglip_loss(x, y, 10.0, -10.0, backend="torch"),
    "moco_loss": lambda m, x, y: m.moco_loss(x, y, y.flip(0), backend="torch"),
}


@pytest.fixture(scope="module")
def group(tmp_path_factory):
    store = tmp_path_factory.mktemp("rendezvous") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_distributed_loss_under_autocast_is_float32_accurate(group, name, dtype):
    generator = torch.Generator().manual_seed(0)
    x, y = (torch.randn(N, D, generator=generator).to(dtype) for _ in range(2))
    truth = CASES[name](fc, x.double(), y.double())
    with torch.autocast("cpu", dtype=dtype):
        loss = CASES[name](fcd, x, y)
    assert loss.dtype == torch.float32
    error = (loss.double() - truth).abs()
    assert error <= 1e-5 * truth.abs().clamp_min(1), f"error {error:.3g}"
    assert CASES[name](fcd, x, y).dtype == dtype  # without autocast: the input dtype
