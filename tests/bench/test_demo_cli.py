"""The quick-start demo, its command line, the peak-memory probe and the benchmark driver, at tiny
sizes (the real measurements are benchmarks/, run on demand)."""
import io
import json
import os
import subprocess
import sys

import pytest

from fastcontrast.cli import build_parser, main, measure

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args, timeout):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_demo_runs_from_the_command_line():
    proc = _run(["-m", "fastcontrast", "demo", "--n", "256", "--dim", "32", "--repeats", "1"], 120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "fastcontrast (" in out and "plain PyTorch" in out
    assert "N = M = 256, D = 32" in out
    assert "peak extra memory" in out and "ratio" in out


def test_cli_parser_has_the_demo_and_its_options():
    args = build_parser().parse_args(["demo", "--n", "8", "--dim", "4", "--repeats", "2",
                                      "--backend", "torch"])
    assert (args.command, args.n, args.dim, args.repeats) == ("demo", 8, 4, 2)
    assert args.backend == "torch"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--n", "0"])


def test_cli_without_a_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_demo_in_process_agrees_between_implementations():
    from rich.console import Console

    from fastcontrast.cli.demo import FASTCONTRAST, NAIVE, run_demo

    printed = io.StringIO()
    result = run_demo(n=64, dim=8, repeats=1, backend="torch", memory=False,
                      console=Console(file=printed, width=100))
    assert "fastcontrast (torch)" in printed.getvalue()
    assert result["loss"][FASTCONTRAST] == pytest.approx(result["loss"][NAIVE], rel=1e-4)
    assert result["median_s"][FASTCONTRAST] > 0 and result["median_s"][NAIVE] > 0


def test_memory_probe_measures_a_known_allocation_and_nothing():
    big = measure.peak_extra_memory(measure.allocation_step, 200 * measure.MiB,
                                    warmup_args=(measure.MiB,))
    none = measure.peak_extra_memory(measure.allocation_step, 0, warmup_args=(measure.MiB,))
    assert 150 * measure.MiB <= big.extra_bytes <= 260 * measure.MiB, big
    assert 0 <= none.extra_bytes < 8 * measure.MiB, none


@pytest.mark.slow
def test_core_targets_quick_writes_its_results(tmp_path):
    out = tmp_path / "quick"
    proc = _run([os.path.join("benchmarks", "core_targets.py"), "--quick", "--repeats", "1",
                 "--out", str(out)], 180)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "core_targets.json").read_text())
    assert {t["part"] for t in result["targets"]} == {"a", "b", "c"}
    assert result["machine"]["torch"] and result["machine"]["cpu"]
    cases = {(r["part"], r["case"]) for r in result["records"]}
    assert {("a", "fastcontrast"), ("a", "naive"), ("b", "fastcontrast")} <= cases
    assert all(r["median_s"] > 0 for r in result["records"])
    assert (out / "core_targets.csv").read_text().startswith("part,case,")
    assert "## Targets" in (out / "summary.md").read_text()
