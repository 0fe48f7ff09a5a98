"""``fastcontrast bench --suite``: the CLI's suite names follow benchmarks/suites.py, the
measurement-script suites reach their module's main with --out and the options after '--',
and only the compat suite runs the peers' fastcontrast.compat twins."""
import importlib

import pytest

from fastcontrast.cli import bench as cli_bench
from fastcontrast.cli import main as cli_main

cli_bench.benchmarks_package()
from fastcontrast.benchmarks import suites  # noqa: E402


def test_cli_suite_names_follow_the_harness():
    assert set(cli_bench.SUITES) == set(suites.SUITES) | {"distributed"}
    assert cli_bench.SCRIPT_SUITES == tuple(suites.SCRIPT_SUITES)


@pytest.mark.parametrize("name", list(suites.SCRIPT_SUITES))
def test_every_script_suite_module_has_a_main(name):
    module = importlib.import_module(f"fastcontrast.benchmarks.{suites.SCRIPT_SUITES[name][0]}")
    assert callable(module.main)


def test_a_script_suite_gets_out_and_the_options_after_the_separator(monkeypatch):
    module = importlib.import_module("fastcontrast.benchmarks.gram_targets")
    seen = []
    monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or 0)
    assert cli_main(["bench", "--suite", "gram", "--out", "OUT", "--", "--rows", "64"]) == 0
    assert seen == [["--out", "OUT", "--rows", "64"]]


def test_options_after_the_separator_are_refused_for_a_case_grid_suite():
    with pytest.raises(SystemExit, match="not --suite smoke: --rows 64"):
        cli_main(["bench", "--suite", "smoke", "--", "--rows", "64"])


def test_only_the_compat_suite_runs_the_twins():
    twins = {case.impl for case, _ in suites.cases(suites.SUITES["compat"])
             if case.impl.startswith("compat ")}
    assert {"compat open_clip ClipLoss", "compat info-nce-pytorch",
            "compat lightly NTXentLoss", "compat pml SupConLoss"} <= twins
    for name, suite in suites.SUITES.items():
        if name != "compat":
            assert not any(case.impl.startswith("compat ") for case, _ in suites.cases(suite))


def test_the_objectives_suite_checks_and_times_each_objective(tmp_path):
    module = importlib.import_module("fastcontrast.benchmarks.objectives_targets")
    result = module.main(["--n", "64", "--dim", "8", "--repeats", "1", "--no-memory",
                          "--out", str(tmp_path)])
    assert set(result["objectives"]) == set(module.OBJECTIVES)
    for name, row in result["objectives"].items():
        values = row["loss"]  # the three implementations compute the same objective
        assert abs(values["objective"] - values["materialised"]) < 1e-4 * abs(
            values["materialised"]), name
        if "open_clip" in values:  # OpenCLIP's DistillClipLoss, both terms (when installed)
            assert abs(values["open_clip"] - values["objective+clip"]) < 1e-4 * abs(
                values["open_clip"])
        assert row["time_vs_plain"] > 0 and row["speedup_vs_materialised"] > 0
    assert (tmp_path / "objectives_targets.json").exists()


@pytest.mark.slow
def test_the_contended_suite_times_each_implementation_quiet_and_busy(tmp_path):
    module = importlib.import_module("fastcontrast.benchmarks.contended")
    result = module.main(["--n", "64", "--dim", "8", "--repeats", "1", "--spinners", "1",
                          "--losses", "info_nce", "--impls", "fused,fused_parallel_host,torch",
                          "--out", str(tmp_path)])
    summary = result["summary"]["info_nce"]
    assert set(summary["speedup"]) == {"fused", "fused_parallel_host"}
    assert {(r["impl"], r["phase"]) for r in result["rows"]} == {
        (impl, phase) for impl in ("fused", "fused_parallel_host", "torch")
        for phase in ("quiet", "busy")}
    with pytest.raises(SystemExit):
        module.main(["--impls", "fused", "--out", str(tmp_path)])
