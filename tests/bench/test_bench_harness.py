"""The benchmark harness itself (fastcontrast bench), on tiny sizes: case isolation, OOM and
timeout recorded as results, the loss cross-check catching a wrong implementation, the outputs
written, the command line, the peer import shims.

This file is also loaded by the benchmark workers as a plugin (runner.Runner(plugins=...)):
``register_fakes()`` adds deliberately misbehaving implementations of the InfoNCE family."""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from fastcontrast.cli import build_parser
from fastcontrast.cli.bench import benchmarks_package

benchmarks_package()  # fastcontrast.benchmarks, installed or from the checkout
from fastcontrast.benchmarks import families as fam  # noqa: E402
from fastcontrast.benchmarks import peers, report, runner as bench_runner  # noqa: E402
from fastcontrast.benchmarks.families import Implementation, Problem  # noqa: E402
from fastcontrast.cli.demo import naive_info_nce  # noqa: E402

MiB = 1 << 20
LEAK = []  # what the leaky fake keeps alive in its process
SMALL = Problem(n=64, d=8)


def _hungry():
    def loss(query, key):
        block = torch.ones(1 << 30, dtype=torch.float32)  # 4 GiB: over any test budget
        return naive_info_nce(query, key) + 0 * block[-1]
    return loss


def _sleepy():
    def loss(query, key):
        time.sleep(60)
        return naive_info_nce(query, key)
    return loss


def _leaky():
    def loss(query, key):
        LEAK.append(torch.ones(150 * MiB // 4))  # stays allocated after the step
        return naive_info_nce(query, key)
    return loss


def _wrong_temperature():
    return lambda query, key: naive_info_nce(query, key, temperature=0.1)  # the family uses 0.07


def register_fakes():
    impls = fam.FAMILIES["infonce"].implementations
    for name, make in (("fake hungry", _hungry), ("fake sleepy", _sleepy),
                       ("fake leaky", _leaky), ("fake wrong", _wrong_temperature)):
        impls[name] = Implementation(name, "baseline", make)
    peers.PEERS["fake missing"] = peers.Peer("no-such-distribution", "no_such_module_xyz",
                                             "Loss", False)
    impls["fake missing peer"] = Implementation(
        "fake missing peer", "peer", lambda: None,
        unavailable=lambda: peers.installed("fake missing"), peer="fake missing")


register_fakes()


@pytest.fixture(scope="module")
def runner():
    return bench_runner.Runner(budget_bytes=512 * MiB, time_limit_s=60, repeats=2,
                               plugins=[os.path.abspath(__file__)])


def _case(impl, problem=SMALL, family="infonce"):
    return bench_runner.Case(family, impl, problem)


def test_a_case_measures_its_own_peak_memory_not_the_previous_ones(runner):
    leaky = runner.run_case(_case("fake leaky"))
    after = runner.run_case(_case("naive"))
    assert leaky["status"] == "OK", leaky
    # The leak (150 MiB per call, the checked first run) is in the leaky case's own peak ...
    assert 140 * MiB <= leaky["peak_extra_bytes"] <= 200 * MiB, leaky["peak_extra_bytes"]
    # ... and nowhere in the next case's, measured in a fresh process.
    assert after["status"] == "OK", after
    assert after["peak_extra_bytes"] < 20 * MiB, after["peak_extra_bytes"]
    assert after["memory_method"] == "VmHWM reset"


def test_out_of_memory_is_a_result(runner):
    record = runner.run_case(_case("fake hungry"), budget_bytes=256 * MiB)
    assert record["status"] == "OOM", record
    assert "allocate" in record["reason"] and "forward+backward" in record["reason"]
    assert record.get("median_s") is None


def test_timeout_is_a_result_and_the_process_is_killed(runner):
    t0 = time.monotonic()
    record = runner.run_case(_case("fake sleepy"), time_limit_s=8)
    assert record["status"] == "TIMEOUT", record
    assert "8 s" in record["reason"]
    assert time.monotonic() - t0 < 30


def test_the_loss_check_catches_a_wrong_implementation_before_timing(runner):
    record = runner.run_case(_case("fake wrong"))
    assert record["status"] == "WRONG", record
    assert record["check"]["status"] == "WRONG" and record["check"]["rel_err"] > 1e-2
    assert "reference" in record["reason"]
    assert record.get("median_s") is None and record.get("timed_runs") is None


def test_a_correct_implementation_passes_the_check_within_tolerance(runner):
    record = runner.run_case(_case("fastcontrast[torch]"))
    assert record["status"] == "OK", record
    assert record["check"]["status"] == "ok" and record["check"]["rel_err"] < 1e-5
    assert record["timed_runs"] == 2 and record["median_s"] > 0
    assert record["products"] == 4 and record["gflops"] > 0  # recomputing backward


def test_a_misconfigured_real_peer_is_caught():
    cls, reason = peers.load_peer("info-nce-pytorch")
    if cls is None:
        pytest.skip(reason)
    inputs = fam.FAMILIES["infonce"].make_inputs(SMALL)
    reference = bench_runner.reference_value(fam.FAMILIES["infonce"], SMALL)
    good = cls(temperature=fam.INFONCE_TAU)(inputs["query"], inputs["key"]).item()
    bad = cls(temperature=0.5)(inputs["query"], inputs["key"]).item()
    from fastcontrast.benchmarks.worker import check_loss

    assert check_loss(good, reference, "fp32")["status"] == "ok"
    assert check_loss(bad, reference, "fp32")["status"] == "WRONG"


def test_a_missing_peer_is_skipped_with_the_reason(runner):
    record = runner.run_case(_case("fake missing peer"))
    assert record["status"] == "SKIPPED"
    assert "no-such-distribution is not installed" in record["reason"]
    assert "bench" in record["reason"]  # says how to install the peers


def test_reference_falls_back_to_the_float64_torch_backend_above_its_memory_cap(monkeypatch):
    family = fam.FAMILIES["ntxent"]
    exact = bench_runner.reference_value(family, SMALL)
    monkeypatch.setattr(bench_runner, "REFERENCE_MAX_BYTES", 0)
    chunked = bench_runner.reference_value(family, SMALL)
    assert exact["method"] == "reference, float64"
    assert chunked["method"].startswith("torch backend, float64")
    assert chunked["value"] == pytest.approx(exact["value"], rel=1e-10)


def test_reference_runs_in_float32_above_its_float64_cap(monkeypatch):
    family = fam.FAMILIES["clip"]
    exact = bench_runner.reference_value(family, SMALL)
    monkeypatch.setattr(bench_runner, "REFERENCE_FP64_MAX_BYTES", 0)
    single = bench_runner.reference_value(family, SMALL)
    assert single["method"].startswith("reference, float32")
    assert single["value"] == pytest.approx(exact["value"], rel=1e-5)
    fp64 = bench_runner.reference_value(family, Problem(n=64, d=8, dtype="fp64"))
    assert fp64["method"] == "reference, float64"  # a float64 case keeps its float64 oracle


def test_a_series_predicts_the_oom_of_a_quadratic_peak():
    from fastcontrast.benchmarks.worker import predicted_peak

    assert predicted_peak([(1024, 100)], 2048) is None  # one point: no prediction
    assert predicted_peak([(1024, 100), (2048, 400)], 4096) == pytest.approx(1600)
    assert predicted_peak([(1024, 100), (2048, 150)], 4096) == pytest.approx(300)  # e >= 1
    assert predicted_peak([(1024, 100), (2048, 900)], 4096) == pytest.approx(3600)  # e <= 2


def test_floor_ratio_and_rates():
    record = {"status": "OK", "median_s": 2.0, "flop_essential": 6e9}
    bench_runner.apply_floor(record, {"status": "OK", "best_gflops": 6.0})
    assert record["floor_s"] == pytest.approx(1.0)
    assert record["time_over_floor"] == pytest.approx(2.0)
    family = fam.FAMILIES["moco"]
    problem = Problem(n=4, d=3, k=10)
    assert fam.essential_flop(family, problem) == 2 * 2 * 4 * 10 * 3


def _recorded_products(run, m, d, backend, row_blocks):
    """{(product, rows, keys, dim)} of the rows x keys x D products ``run`` issues through
    ``backend`` (keys: M, or a chunk of the keys for the cpu backend's chunked backward), read
    from the profiler (aten::mm / aten::addmm_ with a keys x D operand). ``row_blocks``: the
    kernels' block row counts, which tell an accumulated dq (R x D += (R x K) @ (K x D)) from a
    dkeys (K x D += (K x R) @ (R x D)); the test's shapes keep K out of them."""
    from torch.profiler import profile

    run()  # warm (the extension load, first-call initialisation)
    with profile(record_shapes=True) as prof:
        run()
    out = set()
    for event in prof.events():
        shapes = [tuple(s) for s in event.input_shapes if len(s) == 2]
        if len(shapes) < 2:
            continue
        if event.name == "aten::addmm_" and shapes[0][1] == d and shapes[1][0] == shapes[0][0]:
            if backend == "cpu" and shapes[0][0] in row_blocks:  # dq (R x D) += (R x K) @ (K x D)
                out.add(("dq", shapes[0][0], shapes[1][1], d))
            else:  # dkeys (K x D) += (K x R) @ (R x D)
                out.add(("dk", shapes[1][1], shapes[0][0], d))
        elif event.name == "aten::mm" and backend == "cpu" and shapes[0][1] == d and \
                shapes[1][0] == d:
            out.add(("cpu scores", shapes[1][1], shapes[0][0], d))  # keys @ q_blk^T: K x R
        elif event.name == "aten::mm" and backend == "torch" and shapes[1] == (d, m):
            out.add(("torch scores", shapes[0][0], m, d))  # q_chunk @ keys^T: R x M chunk
        elif event.name == "aten::mm" and shapes[1][1] == d and shapes[0][1] == shapes[1][0] \
                and shapes[1][0] != d:
            out.add(("dq", shapes[0][0], shapes[1][0], d))  # (R x K) @ (K x D)
    return out


def _expected_products(n, m, d, backend, symmetric=False, threads=None):
    from fastcontrast.benchmarks._floor import kernel_products

    return {("dk" if p == "dk" else "dq" if p == "dq" else f"{b} scores", rows, keys, dim)
            for b, p, rows, keys, dim in kernel_products(n, m, d, symmetric=symmetric,
                                                         backends=(backend,), threads=threads)}


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_the_floor_measures_the_product_shapes_the_kernels_run(backend, symmetric):
    import fastcontrast

    if backend not in fastcontrast.available_backends("cpu"):
        pytest.skip(f"backend {backend} not available")
    # M = 16384 keys: the cpu kernel's fused path takes R = 256 rows a block (dkeys by key
    # chunks of 2048), the torch backend 256-row chunks; N = 300 leaves a tail block. Symmetric
    # needs N = M: 1600 x 1600 (R = 512, tail 64; key chunks of 1024, tail 576; torch 1600
    # rows). One thread: the cpu kernels run their tiles as tasks on the threads of one parallel
    # region, and the profiler records only the calling thread's ops.
    n, m, d = (1600, 1600, 8) if symmetric else (300, 16384, 8)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, d, generator=gen, requires_grad=True)
    k = torch.randn(m, d, generator=gen, requires_grad=True)
    targets = torch.randint(0, m, (n,), generator=gen)

    def run():
        loss = fastcontrast.info_nce(q, k, symmetric=True, backend=backend) if symmetric else \
            fastcontrast.info_nce(q, k, targets=targets, backend=backend)
        loss.backward()
    expected = _expected_products(n, m, d, backend, symmetric, threads=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recorded = _recorded_products(run, m, d, backend, {rows for _, rows, _, _ in expected})
    finally:
        torch.set_num_threads(threads)
    assert recorded == expected, recorded


def test_kernel_block_rows_follow_the_kernels_budget():
    from fastcontrast.benchmarks._floor import cpu_block_rows, kernel_products, torch_chunk_rows

    assert [cpu_block_rows(n, n, 256) for n in (1024, 8192, 16384, 65536)] == [512, 512, 256, 256]
    assert cpu_block_rows(16384, 16384, 256, large_tile=True) == 512
    assert [torch_chunk_rows(n, n) for n in (1024, 4096, 16384)] == [1024, 1024, 256]
    shapes = kernel_products(8192, 8192, 256, threads=2)
    # two threads keep 3 tiles in flight: R = 512 would take 3 x 16 MiB, over 1.5 budgets
    assert ("cpu", "dq", 256, 8192, 256) in shapes and ("torch", "dk", 512, 8192, 256) in shapes
    assert len(shapes) == 6


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("n", [300, 1024, 4096, 8192, 16384])
def test_floor_block_rows_equal_the_kernels_plan(n, threads):
    """The floor's model of the fused kernel's rows against the extension's own plan."""
    from fastcontrast import _ext
    from fastcontrast.benchmarks._floor import (cpu_block_rows, cpu_in_flight_rows,
                                                cpu_task_block_rows)

    ext = _ext.load_extension()
    if ext is None:
        pytest.skip("C++ extension unavailable")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rows = ext.masked_lse_fused_plan(n, n, 256, 4)[0]
    finally:
        torch.set_num_threads(before)
    block = cpu_task_block_rows(cpu_block_rows(n, n, 256), n, threads)
    assert cpu_in_flight_rows(block, n, n, 256, 4, threads) == rows


def test_time_over_floor_is_at_least_one_by_construction():
    floor = {"status": "OK", "best_gflops": 100.0, "best": "cpu dq 512 x 8192 x 256",
             "matmul_best_gflops": 100.0, "set_by": "matmul"}
    flop = 6e9
    records = [{"status": "OK", "mode": "time", "family": "infonce", "impl": impl, "n": 8192,
                "flop_essential": flop, "samples_s": samples,
                "median_s": sorted(samples)[len(samples) // 2]}
               for impl, samples in (("fast", [0.05, 0.055, 0.07]), ("slow", [0.2, 0.3, 0.25]))]
    records.append({"status": "OOM", "mode": "time", "family": "infonce", "impl": "x",
                    "n": 8192, "flop_essential": flop})
    bench_runner.settle_floor(floor, records)
    assert floor["best_gflops"] == pytest.approx(flop / 0.05 / 1e9)  # faster than the matmuls
    assert floor["set_by"] == "infonce fast N = 8192 (its fastest run)"
    assert floor["matmul_best_gflops"] == 100.0
    for record in records:
        bench_runner.apply_floor(record, floor)
    assert [r.get("time_over_floor") for r in records][2] is None
    assert all(r["time_over_floor"] >= 1 for r in records[:2])
    assert records[0]["time_over_floor"] == pytest.approx(0.055 / 0.05)


def test_the_floor_rate_counts_the_products_a_run_does():
    """A symmetric-Gram run does 2 of the 3 essential products: its rate on the essential work
    (6e9 / 0.03 s = 200 GFLOP/s) must not set the floor; on its own work (4e9 / 0.03 s = 133)
    it does, and its time / floor is then 3/2 of its run-rate ratio, i.e. between 2/3 and 1."""
    gram = fam.FAMILIES["ntxent"].implementations["fastcontrast[cpu]"]
    assert fam.products_run(fam.FAMILIES["ntxent"], gram) == 2.0
    assert fam.products_run(fam.FAMILIES["clip"],
                            fam.FAMILIES["clip"].implementations["fastcontrast[cpu]"]) == 4
    floor = {"status": "OK", "best_gflops": 120.0, "best": "cpu dq 512 x 8192 x 256",
             "matmul_best_gflops": 120.0, "set_by": "matmul"}
    record = {"status": "OK", "mode": "time", "family": "ntxent", "impl": "fastcontrast[cpu]",
              "n": 8192, "flop_essential": 6e9, "flop_run": 4e9, "samples_s": [0.03, 0.032],
              "median_s": 0.032}
    bench_runner.settle_floor(floor, [record])
    assert floor["best_gflops"] == pytest.approx(4e9 / 0.03 / 1e9)
    bench_runner.apply_floor(record, floor)
    assert record["time_over_floor"] == pytest.approx(0.032 / (6e9 / (4e9 / 0.03)))
    assert 2 / 3 <= record["time_over_floor"] < 1


def test_the_default_suite_is_the_curve_over_every_cpu_peer():
    from fastcontrast.benchmarks.suites import SUITES, cases

    suite = SUITES["default"]
    assert suite.sizes == (1024, 2048, 4096, 8192, 16384) and suite.series
    repeats = [suite.repeats_at(n) for n in suite.sizes]
    assert repeats == sorted(repeats, reverse=True) and repeats[-1] >= 1 and repeats[0] > 1
    assert suite.budget_gib == 2.0 and suite.device == "cpu"
    run = {(c.family, c.impl, c.problem.n) for c, skip in cases(suite) if skip is None}
    for family in suite.families:
        peers_of = [name for name, impl in fam.FAMILIES[family].implementations.items()
                    if impl.kind == "peer"]
        for impl in ["fastcontrast[cpu]", "naive"] + peers_of:
            assert {(family, impl, n) for n in suite.sizes} <= run, (family, impl)


def test_a_series_runs_every_n_in_one_process_and_stops_at_the_first_failure(runner):
    small = [_case("naive", Problem(n=n, d=8)) for n in (32, 64)]
    ok = runner.run_series(small, [3, 1])
    assert [r["status"] for r in ok] == ["OK", "OK"], ok
    assert [r["timed_runs"] for r in ok] == [3, 1] and ok[1]["n"] == 64
    assert all(r["check"]["status"] == "ok" for r in ok)
    hungry = runner.run_series([_case("fake hungry", Problem(n=n, d=8)) for n in (32, 64)],
                               [1, 1])
    assert hungry[0]["status"] == "OOM" and hungry[1]["status"] == "OOM"
    assert hungry[1]["inferred"] and "not run" in hungry[1]["reason"]


def test_every_family_builds_inputs_its_reference_accepts():
    for family in fam.FAMILIES.values():
        if family.enabled() is not None:
            continue
        problem = Problem(n=300, d=3, k=5)  # supcon: 300 samples over 100 classes
        inputs = family.make_inputs(problem)
        value = family.reference(**bench_runner._float64(inputs))
        assert torch.isfinite(value) and value > 0, family.name
        naive = family.implementations["naive"].make()(**inputs).detach()
        assert float(naive) == pytest.approx(float(value), rel=1e-4), family.name


def test_smoke_suite_writes_json_csv_png_and_summary(tmp_path):
    from rich.console import Console

    from fastcontrast.benchmarks.driver import run_bench

    printed = tmp_path / "out.txt"
    with open(printed, "w") as f:
        result = run_bench("smoke", out_dir=str(tmp_path), family_names=["infonce"],
                           console=Console(file=f, width=160))
    statuses = {(r["impl"], r["mode"]): r["status"] for r in result["records"]}
    assert statuses[("naive", "time")] == "OK" and statuses[("fastcontrast[torch]", "time")] == "OK"
    assert {s["impl"] for s in result["largest_n"]} == {"naive", "fastcontrast[torch]"}
    assert all(s["largest_n"] == 128 and s["capped"] for s in result["largest_n"])
    data = json.loads((tmp_path / "results.json").read_text())
    floor = data["floors"][0]
    assert floor["status"] == "OK" and floor["best_gflops"] > 0
    names = {p["name"] for p in floor["products"]}
    # N = 64 on two threads: the cpu kernels halve their blocks to 32 rows (two blocks a thread)
    assert any(n.startswith("cpu scores ") and n.endswith(" x 64 x 8") for n in names), names
    assert "torch dk 64 x 64 x 8" in names and "cpu dk 16384" not in " ".join(names), names
    timed = [r for r in data["records"] if r["status"] == "OK" and r["mode"] == "time"]
    assert timed and all(r["time_over_floor"] >= 1 for r in timed)
    csv_text = (tmp_path / "results.csv").read_text()
    assert csv_text.startswith("suite,part,family,impl") and "fastcontrast[torch]" in csv_text
    summary = (tmp_path / "summary.md").read_text()
    assert "InfoNCE" in summary and all(name in summary for name in names), summary
    png = tmp_path / "bench_fp32_d8.png"
    try:
        import matplotlib  # noqa: F401 - the bench extra
    except ImportError:
        assert not png.exists() and any("no plots" in note for note in result["notes"])
    else:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
        assert "bench_fp32_d8.png" in summary
    assert "largest N in budget" in printed.read_text()


def test_a_failure_shows_its_status_with_the_reason_as_a_footnote():
    records = [{"impl": "naive", "status": "OOM", "reason": "can't allocate", "device": "cpu",
                "family": "infonce"},
               {"impl": "fastcontrast[cpu]", "status": "OK", "median_s": 2.0, "device": "cpu",
                "family": "infonce", "peak_extra_bytes": 3 << 20}]
    rows, notes = report._group_rows({"largest_n": []}, records)
    assert rows[0][1] == "OOM [1]" and rows[0][3] == "-" and notes == ["can't allocate"]
    assert rows[1][1] == "OK" and rows[1][3] == "2.00 s" and rows[1][5] == "3.0 MiB"


def test_cli_parses_the_bench_options():
    args = build_parser().parse_args(
        ["bench", "--suite", "full", "--memory-budget", "2.5", "--time-limit", "30",
         "--families", "infonce,clip", "--sizes", "1024,2048", "--no-search", "--device", "cpu"])
    assert (args.command, args.suite, args.memory_budget, args.time_limit) == \
        ("bench", "full", 2.5, 30.0)
    assert args.families == ["infonce", "clip"] and args.sizes == [1024, 2048]
    assert args.search is False and args.plots is True
    for bad in (["bench", "--memory-budget", "0"], ["bench", "--suite", "nope"],
                ["bench", "--sizes", "0"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


def test_bench_help_from_the_console_entry_point():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-m", "fastcontrast", "bench", "--help"], cwd=root,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "--memory-budget" in proc.stdout and "large-batch" in proc.stdout


def test_package_init_skipping_import_and_torchvision_placeholder(tmp_path, monkeypatch):
    pkg = tmp_path / "heavy_pkg_for_shim_test"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the model zoo needs torchvision')\n")
    (pkg / "sub" / "__init__.py").write_text("raise ImportError('also heavy')\n")
    (pkg / "sub" / "loss.py").write_text("from heavy_pkg_for_shim_test import helpers\n"
                                         "def value():\n    return helpers.TWO + 1\n")
    (pkg / "helpers.py").write_text("TWO = 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError):
        __import__("heavy_pkg_for_shim_test.sub.loss")
    module = peers.import_skipping_package_inits("heavy_pkg_for_shim_test.sub.loss")
    assert module.value() == 3
    for name in [m for m in sys.modules if m.startswith("heavy_pkg_for_shim_test")]:
        monkeypatch.delitem(sys.modules, name)
    placeholder = peers._PlaceholderModule("torchvision.ops")
    with pytest.raises(RuntimeError, match="placeholder"):
        placeholder.StochasticDepth(0.1, "row")
