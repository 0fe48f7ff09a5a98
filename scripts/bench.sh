#!/usr/bin/env bash
# Set up (if needed, with the peers) and run the benchmark suite. Extra arguments go to
# `fastcontrast bench` (e.g. --suite full, --out DIR, --memory-budget GB).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --bench
exec .venv/bin/fastcontrast bench "$@"
