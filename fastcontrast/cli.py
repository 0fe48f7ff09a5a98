"""The ``fastcontrast`` command line: one subcommand per task.

    fastcontrast demo [--n 4096] [--dim 256] [--repeats 5] [--backend auto]
    fastcontrast bench [--suite default|full|issue4-targets|gpu] [--device cpu|cuda] [--out DIR]
    fastcontrast train METHOD [--seconds S] [--steps N] [--backend auto] [--plots DIR] [--out DIR]
    python -m fastcontrast demo ...

Each subcommand is registered by an ``_add_<name>(subparsers)`` function that declares its options
and sets ``handler``; the handler imports what it needs lazily (so ``--help`` stays fast) and
returns the exit status.
"""
import argparse
import sys

BACKENDS = ("auto", "cpu", "torch", "reference", "triton")


def positive(kind):
    """An argparse type: ``kind(text)``, rejected unless > 0."""
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


_positive_int = positive(int)


def _add_demo(subparsers):
    p = subparsers.add_parser(
        "demo", help="compare fastcontrast with plain PyTorch on random inputs (CPU, < 1 min)",
        description="InfoNCE forward+backward on the same random fp32 inputs: fastcontrast vs "
                    "plain PyTorch (materialised logits). Prints the loss, the median time and "
                    "the peak extra memory (each measured in a fresh process) of both.")
    p.add_argument("--n", type=_positive_int, default=4096, help="batch size N = M (default 4096)")
    p.add_argument("--dim", type=_positive_int, default=256,
                   help="feature dimension D (default 256)")
    p.add_argument("--repeats", type=_positive_int, default=5,
                   help="timed runs per implementation; the median is reported (default 5)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="fastcontrast backend (default auto: the C++ kernels if built, else torch)")
    p.add_argument("--temperature", type=float, default=0.07, help="tau (default 0.07)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement (saves two process start-ups)")
    p.set_defaults(handler=_run_demo)


def _run_demo(args):
    from .demo import run_demo

    run_demo(n=args.n, dim=args.dim, repeats=args.repeats, backend=args.backend,
             temperature=args.temperature, memory=args.memory)
    return 0


SUITES = ("default", "full", "issue4-targets", "gpu", "smoke")


def _csv_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def _add_bench(subparsers):
    p = subparsers.add_parser(
        "bench", help="benchmark fastcontrast against plain PyTorch and the libraries people use",
        description="Forward+backward of InfoNCE, CLIP and NT-Xent (and SupCon, MoCo, SigLIP "
                    "where available): fastcontrast's backends, plain PyTorch, torch.compile and "
                    "the peer libraries, each case in a fresh process, its loss checked against "
                    "fastcontrast's reference first. Prints the tables and writes results.json, "
                    "results.csv, summary.md and PNG plots. The default suite (N = 8192, "
                    "D = 256, plus the largest N each reaches in a small memory budget) takes "
                    "under 3 minutes on a 2-core CPU.")
    p.add_argument("--suite", choices=SUITES, default="default",
                   help="default (headline), full (N 1024..131072, D 128/256/1024, fp32/bf16), "
                        "issue4-targets (moco, nt_xent, supcon targets), gpu (CUDA grid), "
                        "smoke (tiny)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="run the suite's cases on this device (default: the suite's; gpu: cuda)")
    p.add_argument("--out", default=None,
                   help="output folder (default bench-results/<device>-<machine>-<date>)")
    p.add_argument("--memory-budget", type=positive(float), default=None, metavar="GB",
                   help="extra memory each case may use, in GiB (RLIMIT_AS on CPU, the "
                        "allocator fraction on CUDA; default: half the machine's memory)")
    p.add_argument("--time-limit", type=positive(float), default=None, metavar="S",
                   help="seconds per case before it is killed and recorded as TIMEOUT")
    p.add_argument("--repeats", type=_positive_int, default=None,
                   help="timed runs per case after the checked first run (median reported)")
    p.add_argument("--families", type=_csv_list, default=None, metavar="A,B",
                   help="only these loss families (infonce, clip, ntxent, supcon, moco, siglip)")
    p.add_argument("--impls", type=_csv_list, default=None, metavar="A,B",
                   help="only these implementations (e.g. 'fastcontrast[cpu],naive')")
    p.add_argument("--sizes", type=lambda t: [_positive_int(x) for x in _csv_list(t)],
                   default=None, metavar="N,N", help="replace the suite's N values")
    p.add_argument("--no-search", dest="search", action="store_false",
                   help="skip the largest-N-in-budget search")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    p.set_defaults(handler=_run_bench)


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
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "benchmarks", "_bootstrap.py")
    if not os.path.isfile(path):
        raise RuntimeError("the benchmark suite is not installed: reinstall fastcontrast "
                           "(pip install -e '.[bench]') from a checkout")
    spec = importlib.util.spec_from_file_location("_fastcontrast_bench_bootstrap", path)
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    return bootstrap.ensure_package()


def _run_bench(args):
    benchmarks_package()
    from .benchmarks.driver import run_bench

    result = run_bench(args.suite, out_dir=args.out, device=args.device,
                       budget_gib=args.memory_budget, time_limit_s=args.time_limit,
                       repeats=args.repeats, family_names=args.families, impl_names=args.impls,
                       sizes=args.sizes, search=args.search, plots=args.plots,
                       argv=args.argv)
    failed = [r for r in result["records"] if r["status"] in ("WRONG", "ERROR", "CRASH")]
    return 1 if failed else 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastcontrast", description="Fused, memory-efficient contrastive losses for PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    _add_bench(subparsers)
    from .methods.cli_train import add_train_parser  # the reference methods' trainer

    add_train_parser(subparsers)
    return parser


def _version():
    from . import __version__

    return __version__


def main(argv=None):
    """Entry point of the ``fastcontrast`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[2:] if argv is None else argv[1:])
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except (ValueError, RuntimeError) as exc:  # bad option combination, backend unavailable
        print(f"fastcontrast {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
