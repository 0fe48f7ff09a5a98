"""pytest set-up of the benchmark suites (``pytest benchmarks/``): this folder is importable both
as ``fastcontrast.benchmarks`` (installed, or registered from the checkout) and, for the suites
that import their helpers by module name (``from _momentum_cases import ...``), as a path."""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import _bootstrap  # noqa: E402

_bootstrap.ensure_package()
