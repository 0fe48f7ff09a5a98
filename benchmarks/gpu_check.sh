#!/usr/bin/env bash
# One prepared GPU check, under 8 minutes on one H200 (every step runs under `timeout`; the limits
# add up to 475 s): prints the GPU, runs the GPU tests of the Triton kernels and of the fused
# objectives, then benchmarks/gpu_losses_bench.py: correctness at N = M = 65536, D = 512 in bf16
# against the torch backend in fp32; forward+backward time and TFLOP/s of one-directional and
# symmetric InfoNCE, SigLIP and NT-Xent beside OpenCLIP's ClipLoss and Inf-CL's cal_inf_loss; the
# largest batch at D = 512 (loss memory only); report.md. Everything (logs, json, md with GPU name
# and date) goes into the folder given as the argument.
#   usage: benchmarks/gpu_check.sh OUT_DIR
#   GPU_CHECK_DEVICE=cpu benchmarks/gpu_check.sh OUT_DIR   # dry run: tiny shapes on the CPU in
#                                                          # Triton's interpreter (no GPU tests)
# Needs python3 with a CUDA torch, triton, pytest, numpy; installs nothing and needs no network.
#
# Peers, from wheels kept in wheels/ (git-ignored: copy the folder along with the working tree;
# a missing wheel makes its peer "skipped" with the reason in speed.json and report.md):
#   Inf-CL (pure Python and Triton; not on PyPI as a wheel we use): from a snapshot of the public
#     repository DAMO-NLP-SG/Inf-CLIP (a git clone or archive of it in INFCLIP_DIR), run
#       python3 -m pip wheel --no-deps -w wheels INFCLIP_DIR
#     (builds wheels/inf_cl-1.2-py3-none-any.whl with its pdm backend; none of its code is
#     committed here).
#   OpenCLIP: python3 -m pip download open_clip_torch==3.3.0 --no-deps -d wheels
#     (only open_clip/loss.py runs: benchmarks/peers.py imports it without the package
#     __init__, which needs timm and torchvision).
# The wheels are unpacked into a scratch folder on PYTHONPATH (not installed).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then
  export TRITON_INTERPRET=1
  SIZE=(--n 64 --dim 32 --device cpu)
  BUDGET=6
else
  SIZE=(--n 65536 --dim 512 --device cuda)
  BUDGET=40
fi

# Import fastcontrast (kernels/ as fastcontrast.kernels, benchmarks/ as fastcontrast.benchmarks)
# from a scratch copy: no pip needed. The C++ CPU extension is not built (not needed here).
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
cp -r fastcontrast "$SRC/fastcontrast"
rm -rf "$SRC/fastcontrast/kernels" "$SRC/fastcontrast/benchmarks"
cp -r kernels "$SRC/fastcontrast/kernels"
cp -r benchmarks "$SRC/fastcontrast/benchmarks"
rm -rf "$SRC/fastcontrast/benchmarks/results"
mkdir -p "$SRC/peers"
for wheel in wheels/inf_cl-*.whl wheels/open_clip_torch-*.whl; do
  if [ -f "$wheel" ]; then
    python3 -m zipfile -e "$wheel" "$SRC/peers" && echo "peer wheel unpacked: $wheel"
  else
    echo "peer wheel absent: $wheel (that peer is skipped; see the comment at the top)"
  fi
done | tee "$OUT/peers.txt"
export PYTHONPATH="$SRC:$PWD:$SRC/peers"
export FASTCONTRAST_DISABLE_EXTENSION=1

status=0
step() {  # step NAME TIMEOUT_S COMMAND...: run with a time limit, log to OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/steps.txt"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 20 "$OUT/$name.log"
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/steps.txt"
  [ $rc -eq 0 ] || status=1
}

# 30 s: importing a CUDA build of torch takes 7-15 s on a busy machine without a GPU (the dry run).
step environment 30 bash -c '
  date -u +"%Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,power.draw \
    --format=csv,noheader || echo "nvidia-smi: not available"
  python3 -c "import torch, triton; print(\"torch\", torch.__version__, \"cuda\", \
torch.version.cuda, \"triton\", triton.__version__, \"gpu\", torch.cuda.is_available())"
  nproc'
cp "$OUT/environment.log" "$OUT/environment.txt"

if [ "$DEVICE" = cpu ]; then
  echo "== tests: skipped in the CPU dry run (the interpreter tests run in the test suite)" \
    | tee -a "$OUT/steps.txt"
else
  # The Triton kernels and the losses that use them, on the GPU (the sm_90 compile check,
  # tests/kernels/test_triton_compile.py, runs without a GPU and is left out here).
  step tests 85 python3 -m pytest -x -q -p no:cacheprovider \
    tests/kernels/test_triton_infonce_kernels.py tests/kernels/test_nonfinite_kernels.py \
    tests/kernels/test_masked_lse_contract.py tests/kernels/test_kernel_id_masks.py \
    tests/losses/contract/test_numerics.py tests/losses/contract/test_autocast.py \
    tests/losses/contract/test_gradcheck.py tests/losses/test_siglip.py
  # The fused objectives' Triton kernels (Matryoshka, false-negative filter, distillation, label
  # smoothing, multiple positives) against the float64 reference on the GPU.
  step objectives 120 python3 -m pytest -x -q -p no:cacheprovider -m "not slow" -k triton \
    tests/objectives
fi
BENCH=benchmarks/gpu_losses_bench.py
step correctness 70 python3 "$BENCH" correctness "$OUT" "${SIZE[@]}"
step speed 100 python3 "$BENCH" speed "$OUT" "${SIZE[@]}"
step memory 55 python3 "$BENCH" memory "$OUT" "${SIZE[@]}" --budget-s "$BUDGET"
step report 15 python3 "$BENCH" report "$OUT" "${SIZE[@]}"
echo "gpu_check: exit $status" | tee -a "$OUT/steps.txt"
exit $status
