#!/usr/bin/env bash
# Set up (if needed) and run everything CI runs: lint, the whole test suite on the main
# environment (torch 2.13.0), then the compatibility tiers of scripts/test_matrix.sh (torch
# 2.14.1 and its install paths; the lent GPUs' Python 3.12 / torch 2.11 / triton 3.6).
# Extra arguments go to pytest. FASTCONTRAST_TEST_MATRIX=0 skips the tiers (a quick local run).
# --fast (first argument): the fast tier only, every op on every CPU backend in a few minutes
# (pytest -m "not slow", tests/conftest.py says what is left out), without the tiers.
# FASTCONTRAST_BENCH_PEERS=1 also installs the benchmark's peers (scripts/setup.sh --bench), so
# that the harness tests run against the real libraries instead of skipping those checks.
set -euo pipefail
cd "$(dirname "$0")/.."
FAST=0
if [ "${1:-}" = --fast ]; then
  FAST=1
  shift
fi
if [ "${FASTCONTRAST_BENCH_PEERS:-0}" = 1 ]; then
  ./scripts/setup.sh --bench
else
  ./scripts/setup.sh
fi
# Lint first (configured in pyproject.toml: pycodestyle + pyflakes, lines <= 100).
.venv/bin/ruff check .
if [ "$FAST" = 1 ]; then
  exec .venv/bin/python -m pytest tests -m "not slow" "$@"
fi
.venv/bin/python -m pytest tests "$@"
if [ "${FASTCONTRAST_TEST_MATRIX:-1}" != 0 ]; then
  ./scripts/test_matrix.sh
fi
