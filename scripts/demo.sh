#!/usr/bin/env bash
# Set up (if needed) and run the main job. Extra arguments go to `fastcontrast demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/fastcontrast demo "$@"
