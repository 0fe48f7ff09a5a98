#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Extra arguments go to pytest.
# FASTCONTRAST_BENCH_PEERS=1 also installs the benchmark's peers (scripts/setup.sh --bench), so
# that the harness tests run against the real libraries instead of skipping those checks.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${FASTCONTRAST_BENCH_PEERS:-0}" = 1 ]; then
  ./scripts/setup.sh --bench
else
  ./scripts/setup.sh
fi
# Lint first (configured in pyproject.toml: pycodestyle + pyflakes, lines <= 100).
.venv/bin/ruff check .
exec .venv/bin/python -m pytest tests "$@"
