"""The ``fastcontrast`` command line: one subcommand per task.

    fastcontrast demo [--n 4096] [--dim 256] [--repeats 5] [--backend auto]
    fastcontrast bench [--suite NAME] [--device cpu|cuda] [--out DIR] [-- SCRIPT OPTIONS]
    fastcontrast train METHOD [--seconds S] [--steps N] [--backend auto] [--plots DIR] [--out DIR]
                              [--nproc N] [--device cpu|cuda]
    python -m fastcontrast demo ...

This module builds the parser and runs ``main``. Each subcommand is registered by an
``add_<name>_parser(subparsers)`` function that declares its options and sets ``handler``
(``demo`` here, ``bench`` in bench.py, ``train`` in train.py; shared argument types in
options.py); the handler imports what it needs lazily (so ``--help`` stays fast) and returns the
exit status. The demo itself is demo.py, the measuring helpers it shares with the benchmarks
measure.py.
"""
import argparse
import sys

from .options import BACKENDS, positive_int


def add_demo_parser(subparsers):
    """Register ``demo`` on an argparse subparsers object; its handler is ``run_demo``."""
    p = subparsers.add_parser(
        "demo", help="compare fastcontrast with plain PyTorch on random inputs (CPU, < 1 min)",
        description="InfoNCE forward+backward on the same random fp32 inputs: fastcontrast vs "
                    "plain PyTorch (materialised logits). Prints the loss, the median time and "
                    "the peak extra memory (each measured in a fresh process) of both.")
    p.add_argument("--n", type=positive_int, default=4096, help="batch size N = M (default 4096)")
    p.add_argument("--dim", type=positive_int, default=256,
                   help="feature dimension D (default 256)")
    p.add_argument("--repeats", type=positive_int, default=5,
                   help="timed runs per implementation; the median is reported (default 5)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="fastcontrast backend (default auto: the C++ kernels if built, else torch)")
    p.add_argument("--temperature", type=float, default=0.07, help="tau (default 0.07)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the peak-memory measurement (saves two process start-ups)")
    p.set_defaults(handler=run_demo)
    return p


def run_demo(args):
    """Handler of ``fastcontrast demo``; returns the exit status."""
    from .demo import run_demo as print_demo

    print_demo(n=args.n, dim=args.dim, repeats=args.repeats, backend=args.backend,
               temperature=args.temperature, memory=args.memory)
    return 0


def build_parser():
    """The ``fastcontrast`` argument parser, every subcommand registered."""
    from .bench import add_bench_parser
    from .train import add_train_parser

    parser = argparse.ArgumentParser(
        prog="fastcontrast", description="Fused, memory-efficient contrastive losses for PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_demo_parser(subparsers)
    add_bench_parser(subparsers)
    add_train_parser(subparsers)
    return parser


def _version():
    from .. import __version__

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
