"""One process of an install-path check: import fastcontrast as installed (run it from outside
the source tree), make sure the C++ fast path is there and time the first fused call.

    python scripts/check_fast_path.py [--max-first-call-s S]

Prints one JSON line (torch version, where fastcontrast was imported from, its backends, the
import and first-call seconds: the first call includes loading, or compiling, the extension)
and exits 1 when "cpu" is not among the backends or the first call took longer than S."""
import argparse
import json
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-first-call-s", type=float, default=None,
                        help="fail when the first call takes longer (default: no limit)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    import torch

    import fastcontrast as fc

    imported = time.perf_counter()
    backends = fc.available_backends()
    failures = []
    if "cpu" not in backends:
        failures.append(f"the C++ backend is missing: available_backends() = {backends}")
    else:
        query = torch.randn(64, 32, requires_grad=True)
        loss = fc.info_nce(query, torch.randn(64, 32), backend="cpu")
        loss.backward()
    first_call = time.perf_counter() - imported
    if args.max_first_call_s is not None and first_call > args.max_first_call_s:
        failures.append(f"the first call took {first_call:.1f} s, over {args.max_first_call_s} s")
    print(json.dumps({"torch": torch.__version__, "python": sys.version.split()[0],
                      "fastcontrast": fc.__file__, "backends": backends,
                      "import_s": round(imported - start, 2), "first_call_s": round(first_call, 2),
                      "failures": failures}), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
