#!/usr/bin/env bash
# One prepared GPU check: prints the GPU, runs the Triton tests natively, checks the fused Triton
# InfoNCE at scale against the torch backend in fp32, and times it. Everything it produces goes
# into the folder given as the first argument (default: benchmarks/results/gpu-<date>).
#   usage: benchmarks/gpu_check.sh OUT_DIR
# Needs python3 with torch (CUDA), triton, pytest; installs nothing (works offline).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results/gpu-$(date +%Y%m%d)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

# Import fastcontrast (with kernels/ as fastcontrast.kernels) from a scratch copy: no pip needed.
SRC=$(mktemp -d)
cp -r fastcontrast "$SRC/fastcontrast"
cp -r kernels "$SRC/fastcontrast/kernels"
cp -r csrc "$SRC/csrc"
export PYTHONPATH="$SRC:$PWD"

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/environment.txt"

status=0
timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_triton_infonce_kernels.py \
  "tests/test_info_nce_backends.py" -k "triton or test_triton" 2>&1 | tee "$OUT/gpu_tests.log" \
  || status=1
timeout 240 python3 benchmarks/gpu_infonce_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_infonce_check.log" \
  || status=1
exit $status
