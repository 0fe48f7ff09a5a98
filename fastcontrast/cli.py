"""The ``fastcontrast`` command line: one subcommand per task.

    fastcontrast demo [--n 4096] [--dim 256] [--repeats 5] [--backend auto]
    python -m fastcontrast demo ...

Each subcommand is registered by an ``_add_<name>(subparsers)`` function that declares its options
and sets ``handler``; the handler imports what it needs lazily (so ``--help`` stays fast) and
returns the exit status.
"""
import argparse
import sys

BACKENDS = ("auto", "cpu", "torch", "reference", "triton")


def _positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


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


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastcontrast", description="Fused, memory-efficient contrastive losses for PyTorch.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(subparsers)
    return parser


def _version():
    from . import __version__

    return __version__


def main(argv=None):
    """Entry point of the ``fastcontrast`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
