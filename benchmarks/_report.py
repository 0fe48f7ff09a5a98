"""Writing benchmark results: JSON (everything), CSV (one row per measured thing, to accumulate
across runs and machines) and a markdown summary; and the same summary as a rich table.

A result is a dict with "machine" (fastcontrast._measure.machine_info()), "config", "records"
(measurements: part, case, backend, shape, median/p20/p80 seconds, peak extra bytes, GFLOP/s),
"targets" (checks: part, check, value, display, target, met) and "notes" (strings).
"""
import csv
import json
import os

from fastcontrast._measure import format_bytes, format_seconds

RECORD_FIELDS = ("part", "case", "backend", "n", "m", "d", "dtype", "symmetric", "repeats",
                 "median_s", "p20_s", "p80_s", "gflops", "peak_extra_bytes", "memory_method",
                 "cpu", "threads", "torch", "fastcontrast", "date")


def _verdict(met):
    return {True: "yes", False: "NO", None: "n/a"}[met]


def write_json(path, result):
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def write_csv(path, result):
    machine = result["machine"]
    context = {"cpu": machine["cpu"], "threads": machine["torch_threads"],
               "torch": machine["torch"], "fastcontrast": machine["fastcontrast"],
               "date": machine["date"]}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RECORD_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for record in result["records"]:
            writer.writerow({**context, **record})


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


RECORD_HEADER = ["part", "case", "backend", "N x M x D", "median (p20 - p80)", "GFLOP/s",
                 "peak extra memory"]
TARGET_HEADER = ["part", "check", "measured", "target", "met"]


def _target_cells(target):
    return [target["part"], target["check"], target["display"], target["target"] or "-",
            _verdict(target["met"])]


def write_markdown(path, result, title):
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
    lines += ["", "## Measurements", "", _md_row(RECORD_HEADER),
              _md_row(["---"] * len(RECORD_HEADER))]
    lines += [_md_row(_record_cells(r)) for r in result["records"]]
    if result.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {note}" for note in result["notes"]]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _md_row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_all(out_dir, result, title, stem="core_targets"):
    """JSON + CSV + markdown into ``out_dir`` (created); returns the three paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{stem}.json"), os.path.join(out_dir, f"{stem}.csv"),
             os.path.join(out_dir, "summary.md")]
    write_json(paths[0], result)
    write_csv(paths[1], result)
    write_markdown(paths[2], result, title)
    return paths


def print_tables(console, result, title):
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
