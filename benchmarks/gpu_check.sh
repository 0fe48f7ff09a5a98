#!/usr/bin/env bash
# One prepared GPU check, within about 8 minutes: prints the GPU, builds the extensions, runs the
# test suite on the GPU (tests use CUDA when it is available), the fused Triton InfoNCE check at
# scale, the momentum / SigLIP checks when their scripts exist, and the `fastcontrast bench` GPU
# grid (CUDA-event timing, medians). Everything goes into the folder given as the argument.
#   usage: benchmarks/gpu_check.sh OUT_DIR
# Needs python3 with a CUDA torch, triton, pytest, numpy; installs nothing (works offline; the
# peer libraries are not needed: the grid reports them as skipped when they are absent).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1

# Import fastcontrast (kernels/ as fastcontrast.kernels, benchmarks/ as fastcontrast.benchmarks)
# from a scratch copy: no pip needed.
SRC=$(mktemp -d)
cp -r fastcontrast "$SRC/fastcontrast"
cp -r kernels "$SRC/fastcontrast/kernels"
cp -r benchmarks "$SRC/fastcontrast/benchmarks"
rm -rf "$SRC/fastcontrast/benchmarks/results"
cp -r csrc "$SRC/csrc"
export PYTHONPATH="$SRC:$PWD"
export FASTCONTRAST_BUILD_DIR="$SRC/build"

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.txt"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  [ $rc -eq 0 ] || status=1
}

{
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nproc
} 2>&1 | tee "$OUT/environment.txt"

step build 150 python3 -c "
import fastcontrast
from fastcontrast import _ext
print('cpu extension:', _ext.available())
try:
    from fastcontrast import _cuda_ext
    print('cuda extension:', _cuda_ext.available(), _cuda_ext.unavailable_reason())
except ImportError as error:
    print('cuda extension loader absent:', error)
print('backends on cuda:', fastcontrast.available_backends('cuda'))"
step tests 210 python3 -m pytest tests -x -q -p no:cacheprovider
step infonce_check 90 python3 benchmarks/gpu_infonce_check.py --out "$OUT"
for check in gpu_momentum_check gpu_siglip_check; do
  if [ -f "benchmarks/$check.py" ]; then
    step "$check" 90 python3 "benchmarks/$check.py" "$OUT"
  fi
done
step bench 180 python3 -m fastcontrast bench --suite gpu --out "$OUT/bench" --time-limit 60
echo "gpu_check: exit $status" | tee -a "$OUT/steps.txt"
exit $status
