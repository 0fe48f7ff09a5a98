"""``fastcontrast bench``: run a suite (benchmarks/suites.py) case by case with a progress bar,
print the tables, write results.json / results.csv / summary.md and the PNG plots.

    run_bench(suite_name="default", out_dir=None, device=None, budget_gib=None, ...)

Order of work: the matmul floor of each (D, dtype) (the product shapes fastcontrast's kernels
run at the suite's sizes, benchmarks/_floor.py kernel_products), every case of the grid (an
implementation that ran out of memory or time at some N is not started at larger N of the same
D and dtype: those records say so; a ``series`` suite runs each implementation's N in one
process), then the largest-N search for the default backend and every other implementation,
then the issue-4 target checks; last, the floor is settled (runner.settle_floor: the fastest
rate observed, so time / floor >= 1) and applied to every record.
"""
import os
import shlex
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone

from fastcontrast.cli import measure

from . import families as fam
from .plots import plot_all
from .report import print_tables, write_all
from ._floor import PRODUCTS, kernel_products
from .runner import Runner, apply_floor, settle_floor
from .suites import SUITES, cases

GiB = 1 << 30
SEARCH_TIME_LIMIT_S = 30
PREFERRED = {"cpu": ("cpu", "torch"), "cuda": ("triton",)}  # fastcontrast backend searched


def default_budget_gib(device="cpu"):
    """A safety cap, not a measurement knob: half of the host's memory; 90% of the GPU's."""
    if device == "cuda":
        import torch

        return 0.9 * torch.cuda.get_device_properties(0).total_memory / GiB
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB / 2
    except (ValueError, OSError):
        return 8.0


def _load_average():
    """The 1-minute load average (how busy the machine was: other processes slow every case)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def machine(device):
    info = measure.machine_info()
    if device == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def default_out_dir(info, device):
    tag = (info.get("gpu") or info["cpu"]).split("@")[0].strip().lower()
    tag = "-".join("".join(ch if ch.isalnum() else " " for ch in tag).split()[:3])
    day = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    return os.path.join("bench-results", f"{device}-{tag}-{day}")


def _floor_key(record):
    return (record["d"], record["dtype"])


def floor_products(suite_cases):
    """{(d, dtype): the product shapes fastcontrast's kernels run in the suite's problems}."""
    out = {}
    for case, _ in suite_cases:
        family, problem = fam.FAMILIES[case.family], case.problem
        n, m, d = problem.n, family.columns(problem), problem.d
        shapes = out.setdefault((d, problem.dtype), set())
        if problem.device != "cpu":  # the GPU kernels' tiles are not modelled: big row blocks
            shapes.update(("torch", p, min(n, 8192), min(m, 32768), d) for p in PRODUCTS)
            continue
        elem = fam.DTYPES[problem.dtype].itemsize
        shapes.update(kernel_products(n, m, d, elem, symmetric=case.family == "clip"))
    return out


def _series_key(case):
    return (case.family, case.impl, case.problem.d, case.problem.dtype, case.problem.k)


def run_series_grid(runner, suite, suite_cases, records, advance):
    """The suite's cases, each implementation's N ascending in one worker (Runner.run_series)."""
    series = {}
    for case, skip in suite_cases:
        series.setdefault(_series_key(case), []).append((case, skip))
    for members in series.values():
        members.sort(key=lambda member: member[0].problem.n)
        cases = [case for case, _ in members]
        skip = members[0][1]
        if skip is not None:
            records += [{**runner.describe(c), "status": "SKIPPED", "reason": skip}
                        for c in cases]
            continue
        first = cases[0]
        advance(f"{first.family} {first.impl} N={','.join(str(c.problem.n) for c in cases)}",
                len(cases))
        records += runner.run_series(cases, [suite.repeats_at(c.problem.n) for c in cases])


def run_grid(runner, suite_cases, floors, records, advance):
    """Every case; larger N of an implementation that failed (OOM / TIMEOUT) are not run."""
    fallen = {}
    for case, skip in suite_cases:
        key = (case.family, case.impl, case.problem.d, case.problem.dtype, case.problem.k)
        if skip is not None:
            record = {**runner.describe(case), "status": "SKIPPED", "reason": skip}
        elif key in fallen:
            status, n = fallen[key]
            record = {**runner.describe(case), "status": status, "inferred": True,
                      "reason": f"not run: {status} at N = {n} already"}
        else:
            advance(f"{case.family} {case.impl} N={case.problem.n} {case.problem.dtype}")
            record = runner.run_case(case)
            if record["status"] in ("OOM", "TIMEOUT"):
                fallen[key] = (record["status"], case.problem.n)
        records.append(record)


def search_largest(runner, suite, records, advance):
    """The largest N within the search budget, for each implementation that ran OK at the
    suite's N (fastcontrast: its default backend only, the first of PREFERRED that ran)."""
    summaries, runs = [], []
    budget = int(suite.search_budget_gib * GiB)
    preferred = PREFERRED[suite.device]
    searched_backend = {}
    for record in records:
        if record["status"] == "OK" and record.get("backend") in preferred:
            current = searched_backend.get(record["family"], preferred[-1])
            if preferred.index(record["backend"]) <= preferred.index(current):
                searched_backend[record["family"]] = record["backend"]
    for record in list(records):
        backend = record.get("backend")
        if record["status"] != "OK" or (
                backend is not None and backend != searched_backend.get(record["family"])):
            continue
        advance(f"largest N: {record['family']} {record['impl']}")
        summary, found = runner.largest_n(runner.case_of(record), record, budget,
                                          suite.search_max_n, SEARCH_TIME_LIMIT_S)
        summaries.append(summary)
        runs += found
    return summaries, runs


def targets(records):
    """Issue-4 checks: moco vs the concat-logits loss (>= 1.5x); nt_xent / supcon vs lightly and
    pytorch-metric-learning (>= 1.8x faster, < 5% of their peak extra memory)."""
    ok = {(r["family"], r["impl"]): r for r in records if r["status"] == "OK"
          and r.get("mode") == "time"}
    checks = []
    pairs = (("moco", "naive", 1.5, None), ("ntxent", "lightly NTXentLoss", 1.8, 0.05),
             ("ntxent", "pml NTXentLoss", 1.8, 0.05), ("supcon", "pml SupConLoss", 1.8, 0.05))
    for family, other, speed_target, memory_target in pairs:
        mine, theirs = ok.get((family, "fastcontrast[cpu]")), ok.get((family, other))
        if mine is None or theirs is None:
            checks.append({"check": f"{family}: fastcontrast vs {other}", "display":
                           "not measured (see the records)", "target": f">= {speed_target}x",
                           "met": None})
            continue
        speedup = theirs["median_s"] / mine["median_s"]
        checks.append({"check": f"{family}: speed-up vs {other}", "value": speedup,
                       "display": f"{speedup:.2f}x ({measure.format_seconds(theirs['median_s'])}"
                                  f" / {measure.format_seconds(mine['median_s'])})",
                       "target": f">= {speed_target}x", "met": speedup >= speed_target})
        if memory_target is not None:
            ratio = mine["peak_extra_bytes"] / max(1, theirs["peak_extra_bytes"])
            checks.append({"check": f"{family}: peak extra memory vs {other}", "value": ratio,
                           "display": f"{100 * ratio:.2f}% "
                                      f"({measure.format_bytes(mine['peak_extra_bytes'])} / "
                                      f"{measure.format_bytes(theirs['peak_extra_bytes'])})",
                           "target": f"< {100 * memory_target:.0f}%",
                           "met": ratio < memory_target})
    return checks


def _select(suite_cases, family_names, impl_names, sizes):
    out = []
    for case, skip in suite_cases:
        if family_names and case.family not in family_names:
            continue
        if impl_names and case.impl not in impl_names:
            continue
        if sizes:
            if case.problem.n != min(c.problem.n for c, _ in suite_cases
                                     if c.family == case.family):
                continue
            for n in sizes:
                out.append((replace(case, problem=replace(case.problem, n=n)), skip))
            continue
        out.append((case, skip))
    return out


def _notes(suite, budget_gib):
    notes = [
        "memory: peak resident set (CPU; CUDA: max_memory_allocated) during one forward+backward "
        "minus before it, in a fresh process per case: inputs excluded, gradients included",
        f"memory budget {budget_gib:.1f} GiB per case: RLIMIT_AS set inside the worker after "
        "start-up, warm-up and input creation, at its address-space size then plus the budget "
        "(address space bounds resident memory); on CUDA the allocator's per-process fraction. "
        "An allocation failure is recorded as OOM",
        "before timing, each case's loss is checked against fastcontrast's reference in float64 "
        "on the same inputs (rounded to the case's dtype); a mismatch is WRONG and not timed",
        "time / floor: the essential work (2 products of N x M x D for moco, 3 otherwise: "
        "6 N M D FLOP) at the floor rate: the best warm torch.mm rate measured in this run over "
        "the product shapes fastcontrast's kernels run at the suite's sizes (csrc/cpu/infonce.cpp "
        "block products and fastcontrast/_torch_chunked.py chunk products, named in the floor "
        "line), or an implementation's fastest run if that did the essential work faster (the "
        "floor line says which); so time / floor >= 1 for every timed case. GFLOP/s count the "
        "products each implementation actually runs (a recomputing backward runs one more)",
    ]
    if suite.series:
        notes.append("each implementation's N run ascending in one fresh process (one warm-up; "
                     "before each N the memory cap is lifted, freed memory handed back with "
                     "malloc_trim and the peak reset); an implementation that runs out of "
                     "memory or time at some N is not run at larger N; an N whose peak, "
                     "extrapolated from the implementation's peaks at the two N before it "
                     "(peak ~ N^e, e fitted, in [1, 2]), exceeds 1.25 x the budget is not run "
                     "and shows as OOM (predicted), the prediction in its reason")
    if suite.search_budget_gib:
        notes.append(
            f"largest N in budget: doubling from the suite's N within {suite.search_budget_gib:g} "
            f"GiB of extra memory (RLIMIT_AS, as above) and {SEARCH_TIME_LIMIT_S} s per run, up "
            f"to N = {suite.search_max_n} ('>=' marks the cap); the suite's N counts as reached "
            f"when its measured peak is within the budget. fastcontrast is searched with its "
            f"default backend. A small budget keeps the search short: it shows the shape of the "
            f"curve, not this machine's limit")
    return notes


def run_bench(suite_name="default", out_dir=None, device=None, budget_gib=None,
              time_limit_s=None, repeats=None, family_names=None, impl_names=None, sizes=None,
              search=True, plots=True, console=None, argv=None):
    """Run a suite; print and write its results; return the result dict."""
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # Wide enough for the tables when the output goes to a file rather than a terminal.
    console = console or (Console() if sys.stdout.isatty() else Console(width=170))
    started = time.monotonic()
    load_at_start = _load_average()
    suite = SUITES[suite_name]
    if device is not None and device != suite.device:
        suite = replace(suite, device=device)
    budget_gib = budget_gib or suite.budget_gib or default_budget_gib(suite.device)
    info = machine(suite.device)
    runner = Runner(budget_bytes=int(budget_gib * GiB),
                    time_limit_s=time_limit_s or suite.time_limit_s,
                    repeats=repeats or suite.repeats)
    suite_cases = _select(cases(suite), family_names, impl_names, sizes)
    products = floor_products(suite_cases)
    floor_keys = sorted(products)
    do_search = search and bool(suite.search_budget_gib)
    isolation = "each implementation's N in one fresh process" if suite.series \
        else "each in a fresh process"
    console.print(f"[bold]fastcontrast bench[/] --suite {suite.name}: {suite.description}")
    console.print(f"{info.get('gpu') or info['cpu']}, {info['torch_threads']} threads, torch "
                  f"{info['torch']}; {len(suite_cases)} cases, {isolation}; memory "
                  f"budget {budget_gib:.1f} GiB, time limit {runner.time_limit_s:.0f} s per case")
    result = {"machine": info, "titles": {name: f.title for name, f in fam.FAMILIES.items()},
              "config": {"suite": suite.name, "device": suite.device, "repeats": runner.repeats,
                         "budget": f"{budget_gib:.1f} GiB", "time_limit_s": runner.time_limit_s,
                         "search_budget": f"{suite.search_budget_gib:g} GiB" if do_search
                         else None, "search_max_n": suite.search_max_n if do_search else None,
                         "command": "fastcontrast bench " + shlex.join(argv or [])},
              "records": [], "floors": [], "largest_n": [], "targets": [],
              "notes": _notes(suite, budget_gib)}
    progress = Progress(TextColumn("{task.description:<52}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                        console=console, transient=not console.is_terminal)
    with progress:
        task = progress.add_task("starting", total=len(floor_keys) + len(suite_cases))

        def advance(description):
            progress.update(task, description=escape(description[:52]))
            if not console.is_terminal:  # a log file: one line per step instead of the bar
                console.print(f"[dim]{time.monotonic() - started:6.0f} s  {escape(description)}[/]")

        def done_one(count=1):
            progress.advance(task, count)

        if suite.device == "cpu" and any(c.impl == "fastcontrast[cpu]" for c, _ in suite_cases):
            # Load (or compile, once, into its cache) the C++ extension here, so that no
            # worker spends its time limit compiling it.
            advance("loading fastcontrast's C++ extension")
            from fastcontrast import backends

            backends.available_backends("cpu")
        floors = {}
        for d, dtype in floor_keys:
            advance(f"matmul floor D={d} {dtype}: {len(products[(d, dtype)])} kernel products")
            floors[(d, dtype)] = runner.floor(d, dtype, suite.device, products[(d, dtype)])
            done_one()
        result["floors"] = list(floors.values())

        def advance_case(description, count=1):
            advance(description)
            done_one(count)
        if suite.series:
            run_series_grid(runner, suite, suite_cases, result["records"], advance_case)
        else:
            run_grid(runner, suite_cases, floors, result["records"], advance_case)
        if do_search:
            progress.update(task, total=progress.tasks[0].total + 1)
            result["largest_n"], runs = search_largest(runner, suite, result["records"], advance)
            result["records"] += runs
            done_one()
    for key, floor in floors.items():
        settle_floor(floor, [r for r in result["records"] if _floor_key(r) == key])
    for record in result["records"]:
        apply_floor(record, floors.get(_floor_key(record)))
    if suite.name == "large-batch":
        result["targets"] = targets(result["records"])
    result["config"]["wall_s"] = time.monotonic() - started
    result["config"]["load_average"] = {"start": load_at_start, "end": _load_average()}
    out_dir = out_dir or default_out_dir(info, suite.device)
    os.makedirs(out_dir, exist_ok=True)
    pngs = plot_all(result, out_dir) if plots else []
    if plots and not pngs:
        result["notes"].append("no plots: matplotlib is not installed (the bench extra)")
    paths = write_all(out_dir, result, pngs)
    print_tables(console, result)
    console.print(f"wrote {', '.join(paths + pngs)} in {result['config']['wall_s']:.0f} s")
    return result


if __name__ == "__main__":
    sys.exit("run `fastcontrast bench` (or python -m fastcontrast bench)")
