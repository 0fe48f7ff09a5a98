#!/usr/bin/env bash
# The lent GPU machines' software without their GPU: builds (once, idempotently) .venv-gpu with
# what their image has (Python 3.12, torch 2.11.0 CUDA 13 build, Triton 3.6.0, pytest,
# pytest-benchmark, numpy, ninja, pybind11, hypothesis, rich, setuptools, wheel) and fastcontrast
# (editable, without the C++ extension), then runs there everything that needs no GPU:
#   1. the Triton kernels in Triton's interpreter (the kernel, loss, objective and MoCo tests that
#      use them);
#   2. the sm_90 compile checks (every launch variant compiled by Triton 3.6 and its ptxas, with
#      the register-spill and shared-memory checks; the CUDA sources where nvcc is found);
#   3. benchmarks/gpu_check.sh's CPU dry run (GPU_CHECK_DEVICE=cpu).
# Fails if any of them fails; each step's time is printed.
#   scripts/gpu_env_check.sh [OUT_DIR]   # OUT_DIR keeps the dry run's files (default: a temp dir)
# PYTHON312 names the Python 3.12 interpreter (default: python3.12 on PATH, else pyenv's);
# FASTCONTRAST_GPU_VENV the environment (default .venv-gpu). The first build downloads the CUDA
# build of torch and its CUDA libraries (~5 GB installed). The first compile check fills Triton's
# cache (several minutes on two cores); later runs with unchanged kernels take seconds there.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${PYTHON312:-}" ]; then
  PYTHON=$PYTHON312
elif python3.12 --version > /dev/null 2>&1; then
  PYTHON=python3.12
else  # installed by pyenv beside another selected version: not on PATH, ask for it by version
  version=$(pyenv versions --bare 2> /dev/null | grep -E '^3\.12(\.|$)' | tail -n 1 || true)
  PYTHON=$(PYENV_VERSION=$version pyenv which python3.12 2> /dev/null || echo python3.12)
fi
VENV=${FASTCONTRAST_GPU_VENV:-.venv-gpu}
# The GPU image's releases of torch and Triton.
PINS=("torch==2.11.0" "triton==3.6.0")
TOOLS=(pytest pytest-benchmark numpy ninja pybind11 hypothesis rich setuptools wheel)

step() {  # step NAME COMMAND...: run, print its time; the script fails with the first failure
  local name=$1 t0=$SECONDS
  shift
  echo "== gpu_env_check: $name"
  "$@"
  echo "== gpu_env_check: $name passed in $((SECONDS - t0)) s"
}

build_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
  # A stamp of what was installed: a rerun with the same pins installs nothing (pip would still
  # spend a minute resolving against the registry).
  local stamp="$VENV/fastcontrast-gpu-env.txt" want
  want=$(printf '%s\n' "${PINS[@]}" "${TOOLS[@]}")
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
      && "$VENV/bin/python" -c "import fastcontrast.kernels" 2>/dev/null; then
    echo "$VENV is up to date"
    return
  fi
  local pin
  pin=$(mktemp)
  printf '%s\n' "${PINS[@]}" > "$pin"
  # torch and triton first, pinned: the tools must not pull another torch.
  "${pip[@]}" install "${PINS[@]}"
  "${pip[@]}" install -c "$pin" "${TOOLS[@]}"
  # Without the C++ extension: these checks run only Triton (and the GPU image builds its own).
  FASTCONTRAST_DISABLE_EXTENSION=1 "${pip[@]}" install -c "$pin" --no-build-isolation --no-deps -e .
  rm -f "$pin"
  "$VENV/bin/python" -c "import torch, triton; assert (torch.__version__.split('+')[0],
    triton.__version__) == ('2.11.0', '3.6.0'), (torch.__version__, triton.__version__)"
  echo "$want" > "$stamp"
}

OUT=${1:-}
if [ -z "$OUT" ]; then
  OUT=$(mktemp -d)
  trap 'rm -rf "$OUT"' EXIT
fi
PY="$VENV/bin/python"
# The C++ CPU extension is not built in this environment: its backend's test cases skip.
export FASTCONTRAST_DISABLE_EXTENSION=1
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)

step "environment ($VENV)" build_env
"$PY" -c "import numpy, torch, triton; print('torch', torch.__version__, 'triton',
  triton.__version__, 'numpy', numpy.__version__)"
# The interpreter runs wherever torch sees no GPU (tests/conftest.py sets TRITON_INTERPRET=1).
step "Triton interpreter tests" "${PYTEST[@]}" \
  tests/kernels/test_triton_infonce_kernels.py tests/kernels/test_gram_kernels.py \
  tests/kernels/test_nonfinite_kernels.py tests/kernels/test_masked_lse_contract.py \
  tests/kernels/test_kernel_id_masks.py tests/losses/test_siglip.py \
  tests/moco/test_momentum.py tests/moco/test_queue.py
step "Triton interpreter tests: the fused objectives" "${PYTEST[@]}" -m "not slow" -k triton \
  tests/objectives
step "sm_90 compile checks" "${PYTEST[@]}" -rs \
  tests/kernels/test_triton_compile.py tests/kernels/test_triton_gram_compile.py \
  tests/kernels/test_triton_compile_objectives.py tests/kernels/test_triton_compile_updates.py \
  tests/kernels/test_cuda_sources.py
step "GPU check, CPU dry run" env PATH="$PWD/$VENV/bin:$PATH" GPU_CHECK_DEVICE=cpu \
  benchmarks/gpu_check.sh "$OUT"
echo "gpu_env_check: all passed"
