"""``fastcontrast bench``: its options, and the handler that runs the benchmark suite
(``fastcontrast.benchmarks``, the repository's benchmarks/ folder)."""
from .options import csv_list, positive, positive_int

import argparse

# the case grids of benchmarks/suites.py SUITES, then its SCRIPT_SUITES (kept in step by a test)
SUITES = ("default", "full", "large-batch", "gpu", "smoke", "compat", "distributed")
SCRIPT_SUITES = ("core", "gram", "clip-breakdown", "siglip", "momentum", "memory", "contended",
                 "objectives", "methods-cpc", "methods-dim-amdim-cmc")


def add_bench_parser(subparsers):
    """Register ``bench`` on an argparse subparsers object; its handler is ``run_bench``."""
    p = subparsers.add_parser(
        "bench", help="benchmark fastcontrast against plain PyTorch and the libraries people use",
        description="Forward+backward of InfoNCE, CLIP and NT-Xent (and SupCon, MoCo, SigLIP "
                    "where available): fastcontrast's backends, plain PyTorch, torch.compile and "
                    "the peer libraries, each case in a fresh process, its loss checked against "
                    "fastcontrast's reference first. Prints the tables and writes results.json, "
                    "results.csv, summary.md and PNG plots. The default suite (the curve "
                    "N = 1024 ... 16384, D = 256, in a 2 GiB budget per case) takes about "
                    "3 minutes on a quiet 2-core CPU.")
    p.add_argument("--suite", choices=SUITES + SCRIPT_SUITES, default="default",
                   help="default (the N = 1024 ... 16384 curve), full (N 1024..131072, "
                        "D 128/256/1024, fp32/bf16), "
                        "large-batch (moco, nt_xent, supcon targets), gpu (CUDA grid), "
                        "smoke (tiny), compat (each peer beside its fastcontrast.compat twin), "
                        "distributed (ring / gather vs OpenCLIP on W gloo "
                        "processes, and gradient caching; --sizes N sets the global batch); "
                        "measurement scripts, their options after '--': "
                        + ", ".join(SCRIPT_SUITES))
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="run the suite's cases on this device (default: the suite's; gpu: cuda)")
    p.add_argument("--out", default=None,
                   help="output folder (default bench-results/<device>-<machine>-<date>)")
    p.add_argument("--memory-budget", type=positive(float), default=None, metavar="GB",
                   help="extra memory each case may use, in GiB (RLIMIT_AS on CPU, the "
                        "allocator fraction on CUDA; default: half the machine's memory)")
    p.add_argument("--time-limit", type=positive(float), default=None, metavar="S",
                   help="seconds per case before it is killed and recorded as TIMEOUT")
    p.add_argument("--repeats", type=positive_int, default=None,
                   help="timed runs per case after the checked first run (median reported)")
    p.add_argument("--families", type=csv_list, default=None, metavar="A,B",
                   help="only these loss families (infonce, clip, ntxent, supcon, moco, siglip)")
    p.add_argument("--impls", type=csv_list, default=None, metavar="A,B",
                   help="only these implementations (e.g. 'fastcontrast[cpu],naive')")
    p.add_argument("--sizes", type=lambda t: [positive_int(x) for x in csv_list(t)],
                   default=None, metavar="N,N", help="replace the suite's N values")
    p.add_argument("--no-search", dest="search", action="store_false",
                   help="skip the largest-N-in-budget search")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="-- OPTIONS",
                   help="options of a measurement-script suite (e.g. -- --rows 16384)")
    p.set_defaults(handler=run_bench)
    return p


def benchmarks_package():
    """fastcontrast.benchmarks: installed as a subpackage (setup.py), or, in a checkout whose
    install predates it, the checkout's benchmarks/ folder (benchmarks/_bootstrap.py)."""
    import importlib
    import importlib.util
    import os

    try:
        return importlib.import_module("fastcontrast.benchmarks")
    except ModuleNotFoundError as error:
        if error.name != "fastcontrast.benchmarks":
            raise
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(checkout, "benchmarks", "_bootstrap.py")
    if not os.path.isfile(path):
        raise RuntimeError("the benchmark suite is not installed: reinstall fastcontrast "
                           "(pip install -e '.[bench]') from a checkout")
    spec = importlib.util.spec_from_file_location("_fastcontrast_bench_bootstrap", path)
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    return bootstrap.ensure_package()


def run_bench(args):
    """Handler of ``fastcontrast bench``; returns the exit status (1 if a case failed)."""
    benchmarks_package()
    script_args = [a for a in args.script_args if a != "--"][:]
    if args.suite in SCRIPT_SUITES:
        from ..benchmarks.suites import run_script_suite

        return run_script_suite(args.suite, args.out, script_args)
    if script_args:
        raise SystemExit(f"fastcontrast bench: options after '--' are for the measurement-script "
                         f"suites ({', '.join(SCRIPT_SUITES)}), not --suite {args.suite}: "
                         f"{' '.join(script_args)}")
    if args.suite == "distributed":
        from ..benchmarks.suites import run_distributed

        result = run_distributed(out_dir=args.out, sizes=args.sizes, repeats=args.repeats)
        return 0 if all(r.get("status", "OK") == "OK" for r in result["records"]) else 1
    from ..benchmarks.driver import run_bench as run_suite

    result = run_suite(args.suite, out_dir=args.out, device=args.device,
                       budget_gib=args.memory_budget, time_limit_s=args.time_limit,
                       repeats=args.repeats, family_names=args.families, impl_names=args.impls,
                       sizes=args.sizes, search=args.search, plots=args.plots,
                       argv=args.argv)
    failed = [r for r in result["records"] if r["status"] in ("WRONG", "ERROR", "CRASH")]
    return 1 if failed else 0
