"""Writing benchmark results: the terminal tables, JSON (everything), CSV (one row per measured
thing, to accumulate across runs and machines) and a markdown summary.

Two kinds of result share the writers. A ``fastcontrast bench`` run (benchmarks/driver.py):
"machine", "config", "floors" (matmul rate per D / dtype), "records" (one per case,
benchmarks/runner.py), "largest_n" (the search), "targets" (issue-4 checks) and "notes";
``print_tables`` and ``write_all`` (results.json, results.csv, summary.md). A targets script
(benchmarks/core_targets.py): "machine" (fastcontrast.cli.measure.machine_info()), "config",
"records" (measurements: part, case, backend, shape, median/p20/p80 seconds, peak extra bytes,
GFLOP/s), "targets" (checks: part, check, value, display, target, met) and "notes";
``print_target_tables`` and ``write_target_files``.
"""
import csv
import json
import os

from fastcontrast.cli.measure import format_bytes, format_seconds


def write_json(path, result, indent=1):
    """``result`` as JSON (a value JSON has no type for is written as its str)."""
    with open(path, "w") as f:
        json.dump(result, f, indent=indent, default=str)
        f.write("\n")


def write_csv(path, rows, fields):
    """One CSV row per dict of ``rows``, the columns ``fields`` (other keys are ignored)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_files(out_dir, names, result, csv_rows, csv_fields, summary, indent=1):
    """JSON, CSV and then the markdown ``summary()`` into ``out_dir`` (created), named
    ``names``; returns the three paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, name) for name in names]
    write_json(paths[0], result, indent)
    write_csv(paths[1], csv_rows, csv_fields)
    with open(paths[2], "w") as f:
        f.write(summary())
    return paths


def _md_row(cells):
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def _verdict(met):
    return {True: "yes", False: "NO", None: "n/a"}[met]


# ---------------------------------------------------------------------------------------------
# fastcontrast bench

CSV_FIELDS = ("suite", "part", "family", "impl", "kind", "backend", "peer_version", "n", "m", "d",
              "k", "dtype", "device", "mode", "status", "reason", "loss", "reference",
              "rel_err", "median_s", "p20_s", "p80_s", "timed_runs", "cold_s",
              "peak_extra_bytes", "memory_method", "budget_bytes", "flop_essential",
              "products", "gflops", "floor_s", "time_over_floor", "machine", "threads", "torch",
              "fastcontrast", "date")

HEADER = ("implementation", "status", "loss (rel. err.)", "fwd+bwd time", "vs fastest",
          "peak extra memory", "GFLOP/s", "time / floor", "largest N in budget")


def _fmt_rate(gflops, device):
    if gflops is None:
        return "-"
    return f"{gflops / 1e3:.1f} T" if device == "cuda" else f"{gflops:.0f}"


def _largest(summary):
    if summary is None:
        return "-"
    if summary["largest_n"] is None:
        return f"< smallest ({summary['stopped_by']})"
    prefix = ">= " if summary["capped"] else ""
    stop = "" if summary["capped"] or not summary["stopped_by"] else f" ({summary['stopped_by']})"
    return f"{prefix}{summary['largest_n']}{stop}"


def row_cells(record, fastest_s, largest):
    """The table cells of one record (a failure's reason is returned apart, as a footnote)."""
    status = record["status"]
    check = record.get("check") or {}
    if record.get("loss") is None:
        loss = "-"
    elif check.get("status") in ("ok", "WRONG"):
        loss = f"{record['loss']:.5f} ({check['rel_err']:.0e})"
    else:
        loss = f"{record['loss']:.5f} (unchecked)"
    ok = status == "OK"
    time = format_seconds(record["median_s"]) if ok and record.get("median_s") else "-"
    if ok and record.get("timed_runs") == 0:
        time += " (1 run)"
    relative = f"{record['median_s'] / fastest_s:.2f}x" if ok and fastest_s else "-"
    memory = format_bytes(record["peak_extra_bytes"]) \
        if ok and record.get("peak_extra_bytes") is not None else "-"
    over = f"{record['time_over_floor']:.2f}" if record.get("time_over_floor") else "-"
    name = record["impl"] + (f" {record['peer_version']}" if record.get("peer_version") else "")
    return [name, status, loss, time, relative, memory,
            _fmt_rate(record.get("gflops"), record["device"]), over, largest]


def groups(result):
    """{(family, n, d, dtype, k): [timed records]} in run order (search runs excluded)."""
    out = {}
    for record in result["records"]:
        if record.get("mode") == "reach":
            continue
        key = (record["family"], record["n"], record["d"], record["dtype"], record["k"])
        out.setdefault(key, []).append(record)
    return out


def _group_rows(result, records):
    """(rows, footnotes): a record with a reason gets "[i]" after its status, notes[i - 1]."""
    ok = [r["median_s"] for r in records if r["status"] == "OK" and r.get("median_s")]
    fastest = min(ok) if ok else None
    searched = {(s["family"], s["impl"]): s for s in result.get("largest_n", [])}
    rows, notes = [], []
    for record in records:
        cells = row_cells(record, fastest, _largest(searched.get((record["family"],
                                                                  record["impl"]))))
        if record.get("reason") and record["status"] != "OK":
            notes.append(record["reason"])
            cells[1] += f" [{len(notes)}]"
        rows.append(cells)
    return rows, notes


def _title(key, result):
    family, n, d, dtype, k = key
    queue = f", K = {k}" if k else ""
    return f"{result['titles'].get(family, family)}: N = {n}, D = {d}{queue}, {dtype}"


STYLE = {"OK": "green", "WRONG": "bold red", "ERROR": "bold red", "CRASH": "bold red",
         "OOM": "yellow", "TIMEOUT": "yellow", "SKIPPED": "dim"}


def print_tables(console, result):
    from rich.markup import escape
    from rich.table import Table

    for key, records in groups(result).items():
        rows, notes = _group_rows(result, records)
        caption = "\n".join(f"[{i}] {escape(note)}" for i, note in enumerate(notes, 1))
        table = Table(title=_title(key, result), title_justify="left", caption=caption or None,
                      caption_justify="left")
        for i, name in enumerate(HEADER):
            table.add_column(name, justify="left" if i < 2 else "right")
        for cells, record in zip(rows, records):
            cells = [escape(c) for c in cells]
            cells[1] = f"[{STYLE.get(record['status'], 'dim')}]{cells[1]}[/]"
            table.add_row(*cells)
        console.print(table)
    for target in result.get("targets", []):
        verdict = {True: "[green]met[/]", False: "[bold red]NOT met[/]", None: "[dim]n/a[/]"}
        console.print(f"target {escape(target['check'])}: {escape(target['display'])} "
                      f"(target {escape(target['target'])}): {verdict[target['met']]}")
    for note in result.get("notes", []):
        console.print(f"[dim]- {escape(note)}[/]")


def bench_csv_rows(result):
    """The CSV rows of a bench run: each record with the run's context and its loss check."""
    m = result["machine"]
    context = {"suite": result["config"]["suite"], "machine": m.get("gpu") or m["cpu"],
               "threads": m["torch_threads"], "torch": m["torch"],
               "fastcontrast": m["fastcontrast"], "date": m["date"]}
    for record in result["records"]:
        check = record.get("check") or {}
        yield {**context, **record, "reference": check.get("reference"),
               "rel_err": check.get("rel_err")}


def _isolation(result):
    series = any("one fresh process" in note for note in result.get("notes", []))
    return " (one per implementation, its N ascending: see the notes)" if series else ""


def _repeats(result):
    """'3', or, where the timed runs differ with N, 'N: runs' for each N (from the records)."""
    most = {}
    for r in result["records"]:
        if r.get("mode") == "time" and r.get("timed_runs") is not None:
            most[r["n"]] = max(most.get(r["n"], 0), r["timed_runs"])
    if len(set(most.values())) <= 1:
        return str(result["config"]["repeats"])
    return "(" + ", ".join(f"N = {n}: {k}" for n, k in sorted(most.items())) + ")"


def floor_lines(floor):
    """The floor of one (D, dtype) for summary.md: its rate, what set it, every product shape
    measured (rows x keys x D, best and median rate)."""
    if floor.get("status") != "OK":
        return [f"- matmul floor ({floor['dtype']}, D = {floor['d']}): {floor.get('status')} "
                f"({floor.get('reason')})"]
    if "products" not in floor:  # a result written before the floor named its shapes
        return [f"- matmul floor ({floor['dtype']}, D = {floor['d']}): best torch.mm "
                f"{floor['best_gflops']:.0f} GFLOP/s ({floor['best']}, "
                f"{' x '.join(map(str, floor['shape']))})"]
    matmul = floor.get("matmul_best_gflops", floor["best_gflops"])
    set_by = floor.get("set_by", "matmul")
    source = f"best warm torch.mm rate, {floor['best']}" if set_by == "matmul" else \
        f"set by {set_by}, above the best torch.mm rate {matmul:.0f} GFLOP/s ({floor['best']})"
    lines = [f"- floor ({floor['dtype']}, D = {floor['d']}): {floor['best_gflops']:.0f} GFLOP/s "
             f"({source}), over the {len(floor['products'])} product shapes the kernels run at "
             f"these sizes (backend, product, block rows x keys x D: best / median GFLOP/s):"]
    lines += [f"  - {p['name']}: {p['best_gflops']:.0f} / {p['median_gflops']:.0f}"
              for p in floor["products"]]
    return lines


def curve_table(result):
    """One markdown table per family (dtype, D): time / floor of each implementation against N,
    or its status where it did not run (OOM, TIMEOUT, ...). [] for a single-N run."""
    timed = [r for r in result["records"] if r.get("mode") != "reach"]
    ns = sorted({r["n"] for r in timed})
    if len(ns) < 2:
        return []
    lines = []
    for family, d, dtype in dict.fromkeys((r["family"], r["d"], r["dtype"]) for r in timed):
        rows = [r for r in timed if (r["family"], r["d"], r["dtype"]) == (family, d, dtype)
                and r["status"] != "SKIPPED"]
        if not rows:
            continue
        lines += ["", f"### {result['titles'].get(family, family)}, D = {d}, {dtype}: "
                      f"time (time / floor) against N", "",
                  _md_row(["implementation"] + [f"N = {n}" for n in ns]),
                  _md_row(["---"] * (len(ns) + 1))]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            cells = {r["n"]: (f"{format_seconds(r['median_s'])} ({r['time_over_floor']:.2f})"
                              if r["status"] == "OK" and r.get("time_over_floor")
                              else r["status"] + (" (predicted)" if r.get("predicted") else
                                                  " (not run)" if r.get("inferred") else ""))
                     for r in rows if r["impl"] == impl}
            lines.append(_md_row([impl] + [cells.get(n, "-") for n in ns]))
    return lines


def markdown(result, plots=()):
    m, c = result["machine"], result["config"]
    lines = [f"# fastcontrast bench, suite `{c['suite']}`", "",
             f"- machine: {m.get('gpu') or m['cpu']} ({m['logical_cpus']} logical CPUs, "
             f"{m['torch_threads']} torch threads); torch {m['torch']}, fastcontrast "
             f"{m['fastcontrast']}, Python {m['python']}; {m['date']}",
             f"- command: `{c['command']}`; wall time {c.get('wall_s', 0):.0f} s; load "
             f"average {(c.get('load_average') or {}).get('start')} at the start, "
             f"{(c.get('load_average') or {}).get('end')} at the end "
             f"({m['logical_cpus']} CPUs: above that, other processes shared them)",
             f"- every case forward+backward (gradients of every input that needs one) in a "
             f"fresh process{_isolation(result)}; time = median of up to {_repeats(result)} "
             f"runs after a checked "
             f"first run; memory budget per case {c['budget']}; time limit "
             f"{c['time_limit_s']:.0f} s",
             ""]
    for floor in result.get("floors", []):
        lines += floor_lines(floor)
    lines += curve_table(result)
    for key, records in groups(result).items():
        rows, notes = _group_rows(result, records)
        lines += ["", f"## {_title(key, result)}", "", _md_row(HEADER),
                  _md_row(["---"] * len(HEADER))]
        lines += [_md_row(cells) for cells in rows]
        lines += [""] * bool(notes) + [f"[{i}] {note}  " for i, note in enumerate(notes, 1)]
    if result.get("targets"):
        lines += ["", "## Targets", "", _md_row(["check", "measured", "target", "met"]),
                  _md_row(["---"] * 4)]
        lines += [_md_row([t["check"], t["display"], t["target"], _verdict(t["met"])])
                  for t in result["targets"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                         for p in plots]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def write_all(out_dir, result, plots=()):
    """results.json, results.csv and summary.md into ``out_dir``; returns their paths."""
    return _write_files(out_dir, ("results.json", "results.csv", "summary.md"), result,
                        bench_csv_rows(result), CSV_FIELDS, lambda: markdown(result, plots))


# ---------------------------------------------------------------------------------------------
# Targets scripts (core_targets.py)

TARGET_CSV_FIELDS = ("part", "case", "backend", "n", "m", "d", "dtype", "symmetric", "repeats",
                     "median_s", "p20_s", "p80_s", "gflops", "peak_extra_bytes",
                     "memory_method", "cpu", "threads", "torch", "fastcontrast", "date")


def _record_cells(record):
    time = "-" if record.get("median_s") is None else (
        f"{format_seconds(record['median_s'])} ({format_seconds(record['p20_s'])} - "
        f"{format_seconds(record['p80_s'])})" if record.get("p20_s") is not None
        else format_seconds(record["median_s"]))
    extra = record.get("peak_extra_bytes")
    memory = "-" if extra is None else format_bytes(extra)
    gflops = "-" if record.get("gflops") is None else f"{record['gflops']:.0f}"
    shape = f"{record['n']} x {record['m']} x {record['d']}"
    backend = record.get("backend") or "-"
    return [record["part"], record["case"], backend, shape, time, gflops, memory]


TARGET_RECORD_HEADER = ["part", "case", "backend", "N x M x D", "median (p20 - p80)",
                        "GFLOP/s", "peak extra memory"]
TARGET_HEADER = ["part", "check", "measured", "target", "met"]


def _target_cells(target):
    return [target["part"], target["check"], target["display"], target["target"] or "-",
            _verdict(target["met"])]


def target_markdown(result, title):
    """summary.md of a targets script: the machine, the targets, the measurements, the notes."""
    m = result["machine"]
    lines = [f"# {title}", "",
             f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs, "
             f"{m['torch_threads']} torch threads)",
             f"- torch {m['torch']}, fastcontrast {m['fastcontrast']}, Python {m['python']}, "
             f"{m['platform']}",
             f"- date: {m['date']}",
             f"- config: {', '.join(f'{k}={v}' for k, v in result['config'].items())}", "",
             "## Targets", "", _md_row(TARGET_HEADER), _md_row(["---"] * len(TARGET_HEADER))]
    lines += [_md_row(_target_cells(t)) for t in result["targets"]]
    lines += ["", "## Measurements", "", _md_row(TARGET_RECORD_HEADER),
              _md_row(["---"] * len(TARGET_RECORD_HEADER))]
    lines += [_md_row(_record_cells(r)) for r in result["records"]]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    return "\n".join(lines) + "\n"


def write_target_files(out_dir, result, title, stem="core_targets"):
    """JSON + CSV + markdown into ``out_dir`` (created); returns the three paths."""
    machine = result["machine"]
    context = {"cpu": machine["cpu"], "threads": machine["torch_threads"],
               "torch": machine["torch"], "fastcontrast": machine["fastcontrast"],
               "date": machine["date"]}
    rows = ({**context, **record} for record in result["records"])
    return _write_files(out_dir, (f"{stem}.json", f"{stem}.csv", "summary.md"), result, rows,
                        TARGET_CSV_FIELDS, lambda: target_markdown(result, title), indent=2)


def print_target_tables(console, result, title):
    """The targets and the measurements as rich tables (the p20 - p80 spread is in the files)."""
    from rich.table import Table

    records = Table(title=f"{title}: measurements")
    for name in ("part", "case", "N x M x D", "median", "GFLOP/s", "peak extra memory"):
        records.add_column(name, justify="left" if name in ("part", "case") else "right")
    for record in result["records"]:
        part, case, backend, shape, _, gflops, memory = _record_cells(record)
        case = case if backend == "-" else f"{case} ({backend})"
        median = "-" if record["median_s"] is None else format_seconds(record["median_s"])
        records.add_row(part, case, shape, median, gflops, memory)
    console.print(records)
    targets = Table(title=f"{title}: targets")
    for name in TARGET_HEADER:
        targets.add_column(name)
    style = {True: "green", False: "bold red", None: "dim"}
    for target in result["targets"]:
        cells = _target_cells(target)
        cells[-1] = f"[{style[target['met']]}]{cells[-1]}[/]"
        targets.add_row(*cells)
    console.print(targets)
    for note in result.get("notes", []):
        console.print(f"- {note}")
