#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch, then
# fastcontrast itself (editable, C++ extension compiled ahead of time) with its test extras.
# Override the torch requirement with FASTCONTRAST_TORCH_SPEC (e.g. "torch" on a GPU machine).
#   scripts/setup.sh [--bench]
# --bench also installs what `fastcontrast bench` compares with: the `bench` extra (matplotlib,
# info-nce-pytorch, pytorch-metric-learning) and, without their declared dependencies,
# open-clip-torch and lightly (they declare torchvision, which does not load beside every torch
# build; the benchmark loads only their loss modules, see benchmarks/peers.py). Every install
# runs with the installed torch pinned, so none of them can replace it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FASTCONTRAST_VENV:-.venv}
TORCH_SPEC=${FASTCONTRAST_TORCH_SPEC:-torch==2.13.0}
BENCH=0
for arg in "$@"; do
  case "$arg" in
    --bench) BENCH=1 ;;
    *) echo "usage: scripts/setup.sh [--bench]" >&2; exit 2 ;;
  esac
done

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first and pinned: an unpinned torch requirement can pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "$TORCH_SPEC"
fi
PIN=$(mktemp)
trap 'rm -f "$PIN"' EXIT
# the installed distribution's version (torch.__version__ may carry a local label, +cu130,
# that its metadata lacks: a pin on it would match nothing)
"$VENV/bin/python" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > "$PIN"
"${PIP[@]}" install -c "$PIN" "setuptools>=64" wheel ninja pybind11
# --no-build-isolation: build against the torch above (an isolated build cannot see it).
EXTRAS=test
if [ "$BENCH" = 1 ]; then EXTRAS=test,bench; fi
"${PIP[@]}" install -c "$PIN" --no-build-isolation -e ".[$EXTRAS]"
if [ "$BENCH" = 1 ]; then
  "${PIP[@]}" install -c "$PIN" --no-deps open-clip-torch==3.3.0 lightly==1.6.0
fi
