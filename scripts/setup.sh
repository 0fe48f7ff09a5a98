#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of torch, then
# fastcontrast itself (editable, C++ extension compiled ahead of time) with its test extras.
# Override the torch requirement with FASTCONTRAST_TORCH_SPEC (e.g. "torch" on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${FASTCONTRAST_VENV:-.venv}
TORCH_SPEC=${FASTCONTRAST_TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# torch first and pinned: an unpinned torch requirement can pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "$TORCH_SPEC"
fi
"${PIP[@]}" install "setuptools>=64" wheel ninja pybind11
# --no-build-isolation: build against the torch above (an isolated build cannot see it).
"${PIP[@]}" install --no-build-isolation -e ".[test]"
