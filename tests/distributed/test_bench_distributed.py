"""``fastcontrast bench --suite distributed`` (benchmarks/distributed_targets.py) on tiny sizes:
the records it produces, a wrong loss caught, and workers that always exit."""
import time

import pytest

from fastcontrast.cli import build_parser
from fastcontrast.cli.bench import benchmarks_package

benchmarks_package()
from fastcontrast.benchmarks import distributed_targets as dt  # noqa: E402

N, D, W = 128, 8, 2


@pytest.fixture(scope="module")
def tiny():
    return dt.run(n=N, d=D, world=W, rounds=2, gradcache_n=32, chunk=8, image=8, timeout_s=30,
                  deadline_s=120, progress=lambda message: None)


def test_records_are_sane(tiny, tmp_path):
    losses = {r["backend"]: r for r in tiny["records"] if r["part"] == "losses"}
    assert set(losses) == set(dt.IMPLS)
    block = (N // W) * D * 4  # one rank's text (or image) block, bytes
    for impl, r in losses.items():
        assert r["status"] == "OK", (impl, r["check"])
        assert r["check"]["rel_err"] < 1e-5
        assert len(r["round_s"]) == 2 and r["median_s"] > 0
        assert len(r["peak_extra_bytes_per_rank"]) == W
        assert r["bytes_sent"] >= block, impl  # every mode sends at least one key block
    # OpenCLIP gathers both features forward: (W - 1) blocks each
    assert losses["open_clip"]["calls"]["all_gather"] == 2
    assert "batch_isend_irecv" in losses["ring"]["calls"]
    assert "key_bytes" in losses["ring"] and "key_bytes" in losses["gather"]
    runs = tiny["gradcache"]["runs"]
    assert runs["gradcache"]["loss"] == pytest.approx(runs["plain"]["loss"], rel=1e-5)
    assert tiny["gradcache"]["grad_rel_diff"] < 1e-4
    names = [t["check"] for t in tiny["targets"]]
    assert sum("speed-up" in n for n in names) == 2 and any("key memory" in n for n in names)
    assert any("gradcache peak" in n for n in names)
    paths = dt.write(tiny, str(tmp_path))
    text = open(paths[2]).read()
    assert "Per rank" in text and "bytes sent" in text


def test_a_wrong_loss_is_caught(tiny):
    reference = {**tiny["reference"], "value": tiny["reference"]["value"] * 1.01}
    records = dt.combine(tiny["ranks"], N, D, W, reference)
    assert all(r["status"] == "WRONG" for r in records)
    checks = dt.targets(records, None, W)
    assert [c["met"] for c in checks if "reference" in c["check"]] == [False] * 3


def test_key_memory_definition():
    rank = {"impls": {"ring": {"peak_extra_bytes": 100 << 20}},
            "half_d": {"ring": {"peak_extra_bytes": 70 << 20}}}
    # 2 (peak(D) - peak(D/2)) less the two input gradients of N/W x D fp32
    assert dt.key_memory(rank, "ring", 1024, 256, 2) == 60 * (1 << 20) - 2 * 512 * 256 * 4


def test_a_failing_rank_does_not_hang():
    port = dt._free_port()
    specs = [{"mode": "losses", "world": 2, "rank": rank, "port": port, "n": 64, "d": 4,
              "impls": ["ring"] if rank == 0 else ["no such loss"], "rounds": 1,
              "timeout_s": 5} for rank in range(2)]
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="no such loss"):
        dt.launch(specs, deadline_s=60)
    assert time.monotonic() - started < 60


def test_cli_accepts_the_suite():
    args = build_parser().parse_args(["bench", "--suite", "distributed", "--sizes", "256"])
    assert args.suite == "distributed" and args.sizes == [256]
