"""Check the core InfoNCE targets in ONE run, side by side; write JSON, CSV and a markdown summary.

    python benchmarks/core_targets.py --out benchmarks/results/<name> [--repeats 3] [--quick]
    python -m fastcontrast.benchmarks.core_targets ...        (the same, installed)

(a) N = M = 16384, D = 256, fp32, forward+backward, reduction "mean": fastcontrast vs naive
    PyTorch. Targets: speedup >= 1.6x; time / floor <= 1.25, the floor being 6 N M D FLOP at the
    best torch.mm rate measured in this run (benchmarks/_floor.py); peak extra memory < 2% of
    naive's.
(b) N = M = 131072, D = 128: fastcontrast completes, within 24 GiB of extra memory. Naive is not
    run: its logits alone would take N * M * 4 bytes = 64 GiB.
(c) symmetric=True vs the one-directional loss at (a)'s size: time ratio < 1.4.

How it measures (fastcontrast/cli/measure.py): (a) and (c) share one loop on the same inputs;
each round runs every case once, in a rotated order, plus each torch.mm orientation of the floor,
so that the noise of a shared machine falls on all of them alike; medians over the rounds. Targets
are judged on ratios of medians; "per round" is the median of the ratios within each round,
which load changing from round to round does not skew. Peak extra memory: each implementation
once more in a fresh process (VmHWM reset). (b) takes minutes, so it runs once, in a fresh
process that reports both its time and its peak memory.
--quick shrinks every size (a smoke test of the script; its numbers are not the targets').
"""
import argparse
import sys
from dataclasses import asdict, dataclass

if __package__ in (None, ""):  # run as a script: sys.path[0] is this folder
    import _bootstrap

    _bootstrap.ensure_package()

from fastcontrast.benchmarks._cases import TEMPERATURE, case_memory_args, case_steps, \
    concrete_backend, info_nce_flop, make_inputs, make_step  # noqa: E402
from fastcontrast.benchmarks._floor import ORIENTATIONS, floor_from_medians, matmul_steps, \
    repeated  # noqa: E402
from fastcontrast.benchmarks.report import print_target_tables, write_target_files  # noqa: E402
from fastcontrast.cli.measure import GiB, format_bytes, format_seconds, machine_info, \
    paired_ratio, peak_extra_memory, summarize, time_interleaved

TITLE = "fastcontrast core targets (CPU, fp32)"
SPEEDUP_TARGET = 1.6
FLOOR_RATIO_TARGET = 1.25
MEMORY_RATIO_TARGET = 0.02
LARGE_MEMORY_LIMIT = 24 * GiB
SYMMETRIC_RATIO_TARGET = 1.4
MM_CALLS_PER_ROUND = 5  # each floor sample averages this many products


@dataclass(frozen=True)
class Sizes:
    n: int            # (a), (c): N = M
    dim: int
    floor: tuple      # (rows, keys, dim) of the torch.mm floor
    large_n: int      # (b)
    large_dim: int
    warmup_n: int     # untimed warm-up problem (lazy initialisation, extension load)


FULL = Sizes(n=16384, dim=256, floor=(1024, 16384, 256), large_n=131072, large_dim=128,
             warmup_n=2048)
QUICK = Sizes(n=2048, dim=64, floor=(256, 2048, 64), large_n=8192, large_dim=32, warmup_n=256)


def _target(part, check, value, display, target, met, **extra):
    """One target check; ``value`` is what ``met`` is judged on (ratios of medians)."""
    return {"part": part, "check": check, "value": value, "display": display, "target": target,
            "met": met, **extra}


def _record(part, case, backend, n, m, d, *, symmetric=False, times=None, flop=None,
            memory=None, repeats=None):
    """One measured thing. ``times``: the timed rounds (median, p20, p80); without them, the
    single run timed by the memory probe (``memory``)."""
    if times:
        stats = summarize(times)
    else:
        stats = {"median_s": None if memory is None else memory.seconds, "p20_s": None,
                 "p80_s": None}
    median = stats["median_s"]
    return {"part": part, "case": case, "backend": backend, "n": n, "m": m, "d": d,
            "dtype": "fp32", "symmetric": symmetric, "repeats": repeats if times else 1, **stats,
            "gflops": None if (flop is None or not median) else flop / median / 1e9,
            "peak_extra_bytes": None if memory is None else memory.extra_bytes,
            "memory_method": None if memory is None else memory.method}


def measure_timings(sizes, repeats, backend, parts):
    """Interleaved rounds over the cases of (a) and (c) and the floor's products."""
    names = ["fastcontrast"] + (["naive"] if "a" in parts else []) + \
        (["fastcontrast symmetric"] if "c" in parts else [])
    # Warm up on a small problem: one-time costs stay out of the first timed round.
    for step in case_steps(names, *make_inputs(sizes.warmup_n, sizes.dim), backend).values():
        step()
    query, key = make_inputs(sizes.n, sizes.dim)
    steps = case_steps(names, query, key, backend)
    if "a" in parts:
        for orientation, product in matmul_steps(*sizes.floor).items():
            product()
            steps[f"torch.mm {orientation}"] = repeated(product, MM_CALLS_PER_ROUND)
    samples = time_interleaved(steps, repeats, warmup=0)
    for orientation in ORIENTATIONS:
        name = f"torch.mm {orientation}"
        if name in samples:
            samples[name] = [t / MM_CALLS_PER_ROUND for t in samples[name]]
    return samples


def measure_memory(case, n, dim, backend, warmup_n):
    args = case_memory_args(case, n, dim, backend)
    warmup = case_memory_args(case, warmup_n, dim, backend)
    return peak_extra_memory(make_step, *args, warmup_args=warmup)


def part_a(sizes, samples, backend, repeats, records, targets, log):
    n, d = sizes.n, sizes.dim
    flop = info_nce_flop(n, n, d)
    memory = {}
    for case in ("fastcontrast", "naive"):
        log(f"(a) peak memory of {case} in a fresh process ...")
        memory[case] = measure_memory(case, n, d, backend, sizes.warmup_n)
    for case in ("fastcontrast", "naive"):
        records.append(_record("a", case, backend if case == "fastcontrast" else None, n, n, d,
                               times=samples[case], flop=flop, memory=memory[case],
                               repeats=repeats))
    medians = {orientation: summarize(samples[f"torch.mm {orientation}"])["median_s"]
               for orientation in ORIENTATIONS}
    floor = floor_from_medians(medians, sizes.floor, flop)
    rows, keys, fd = sizes.floor
    for orientation in ORIENTATIONS:
        records.append(_record("a floor", f"torch.mm {orientation}", None, rows, keys, fd,
                               times=samples[f"torch.mm {orientation}"],
                               flop=2 * rows * keys * fd, repeats=repeats))
    fast = summarize(samples["fastcontrast"])["median_s"]
    naive = summarize(samples["naive"])["median_s"]
    speedup = naive / fast
    paired = paired_ratio(samples["naive"], samples["fastcontrast"])
    over_floor = fast / floor["floor_s"]
    mem_ratio = memory["fastcontrast"].extra_bytes / max(1, memory["naive"].extra_bytes)
    targets += [
        _target("a", "speedup, naive / fastcontrast time", speedup,
                f"{speedup:.2f}x ({format_seconds(naive)} / {format_seconds(fast)}; "
                f"per round {paired:.2f}x)",
                f">= {SPEEDUP_TARGET}x", speedup >= SPEEDUP_TARGET, per_round=paired),
        _target("a", "fastcontrast time / floor", over_floor,
                f"{over_floor:.2f} (floor {format_seconds(floor['floor_s'])} = 6NMD at "
                f"{floor['best_gflops']:.0f} GFLOP/s, torch.mm {floor['best']})",
                f"<= {FLOOR_RATIO_TARGET}", over_floor <= FLOOR_RATIO_TARGET),
        _target("a", "peak extra memory, fastcontrast / naive", mem_ratio,
                f"{100 * mem_ratio:.2f}% ({format_bytes(memory['fastcontrast'].extra_bytes)} / "
                f"{format_bytes(memory['naive'].extra_bytes)})",
                f"< {100 * MEMORY_RATIO_TARGET:.0f}%", mem_ratio < MEMORY_RATIO_TARGET),
    ]
    return floor


def part_b(sizes, backend, records, targets, notes, log):
    n, d = sizes.large_n, sizes.large_dim
    log(f"(b) fastcontrast forward+backward at N = M = {n}, D = {d}, in a fresh process "
        f"(one run; minutes at full size) ...")
    naive_logits = n * n * 4
    try:
        memory = measure_memory("fastcontrast", n, d, backend, sizes.warmup_n)
    except Exception as exc:  # killed for memory, extension crash: that is the finding
        notes.append(f"(b) failed: {type(exc).__name__}: {exc}")
        targets.append(_target("b", "forward+backward completes", None, "failed", "completes",
                               False))
        return
    records.append(_record("b", "fastcontrast", backend, n, n, d, flop=info_nce_flop(n, n, d),
                           memory=memory))
    targets += [
        _target("b", "forward+backward completes", memory.seconds,
                f"yes, {format_seconds(memory.seconds)} (loss {memory.value:.4f})", "completes",
                True),
        _target("b", "peak extra memory", memory.extra_bytes, format_bytes(memory.extra_bytes),
                f"<= {format_bytes(LARGE_MEMORY_LIMIT)}", memory.extra_bytes <= LARGE_MEMORY_LIMIT),
        _target("b", "naive logits alone (not run)", naive_logits,
                f"{format_bytes(naive_logits)} (N * M * 4 bytes)", None, None),
    ]


def part_c(sizes, samples, backend, repeats, records, targets):
    n, d = sizes.n, sizes.dim
    records.append(_record("c", "fastcontrast symmetric", backend, n, n, d, symmetric=True,
                           times=samples["fastcontrast symmetric"], flop=info_nce_flop(n, n, d),
                           repeats=repeats))
    if not any(r["part"] == "a" and r["case"] == "fastcontrast" for r in records):
        records.append(_record("c", "fastcontrast", backend, n, n, d,
                               times=samples["fastcontrast"], flop=info_nce_flop(n, n, d),
                               repeats=repeats))
    sym = summarize(samples["fastcontrast symmetric"])["median_s"]
    one = summarize(samples["fastcontrast"])["median_s"]
    ratio = sym / one
    paired = paired_ratio(samples["fastcontrast symmetric"], samples["fastcontrast"])
    targets.append(_target("c", "symmetric / one-directional time", ratio,
                           f"{ratio:.2f} ({format_seconds(sym)} / {format_seconds(one)}; "
                           f"per round {paired:.2f})",
                           f"< {SYMMETRIC_RATIO_TARGET}", ratio < SYMMETRIC_RATIO_TARGET,
                           per_round=paired))


def run(sizes, repeats, requested_backend, parts, log):
    backend = concrete_backend(requested_backend)
    result = {"machine": machine_info(),
              "config": {"quick": sizes is QUICK, "repeats": repeats, "backend": requested_backend,
                         "resolved_backend": backend, "temperature": TEMPERATURE,
                         "reduction": "mean", "parts": "".join(parts), **asdict(sizes)},
              "records": [], "targets": [], "notes": []}
    notes = result["notes"]
    if requested_backend == "auto" and backend != "cpu":
        notes.append(f"backend 'auto' resolved to {backend!r}: the C++ extension is not available "
                     f"here, so these are the pure-PyTorch backend's numbers")
    if sizes is QUICK:
        notes.append("--quick: reduced sizes, a smoke test; the targets apply to the full sizes")
    if "a" in parts or "c" in parts:
        log(f"(a/c) timing at N = M = {sizes.n}, D = {sizes.dim}: {repeats} interleaved rounds ...")
        samples = measure_timings(sizes, repeats, backend, parts)
        if "a" in parts:
            floor = part_a(sizes, samples, backend, repeats, result["records"], result["targets"],
                           log)
            result["floor"] = floor
        if "c" in parts:
            part_c(sizes, samples, backend, repeats, result["records"], result["targets"])
    if "b" in parts:
        part_b(sizes, backend, result["records"], result["targets"], notes, log)
    notes.append("time ratios: ratio of the medians (what the target is judged on); 'per round': "
                 "median over rounds of the ratio within a round")
    notes.append("peak extra memory: peak resident set during one forward+backward minus the "
                 "resident set before it (inputs excluded, gradients included), each "
                 "implementation in a fresh process")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True,
                   help="output folder for core_targets.json, core_targets.csv and summary.md")
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    p.add_argument("--repeats", type=int, default=3,
                   help="interleaved timing rounds for (a) and (c); medians over them (default 3)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "torch", "reference"),
                   help="fastcontrast backend (default auto: cpu if the extension is there, "
                        "else torch)")
    p.add_argument("--parts", default="abc",
                   help="which checks to run, any of a, b, c (default abc)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if not args.parts or set(args.parts) - set("abc"):
        p.error(f"--parts takes letters among a, b, c, got {args.parts!r}")
    return args


def main(argv=None):
    from rich.console import Console

    args = parse_args(argv)
    # Wide enough for the tables when the output goes to a log file rather than a terminal.
    console = Console() if sys.stdout.isatty() else Console(width=140)
    log = lambda message: console.print(f"[dim]{message}[/]")  # noqa: E731
    sizes = QUICK if args.quick else FULL
    result = run(sizes, args.repeats, args.backend, sorted(set(args.parts)), log)
    paths = write_target_files(args.out, result, TITLE)
    print_target_tables(console, result, TITLE)
    console.print("wrote " + ", ".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
