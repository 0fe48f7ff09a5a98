#!/usr/bin/env bash
# The compatibility tiers CI runs after the full suite (scripts/test.sh), each in environments of
# its own beside the main .venv:
#   torch214   torch 2.14.1 (a CUDA build that runs on the CPU): editable install with the
#              extension built ahead of time, the compatibility subset of the tests (every loss
#              on every CPU backend, torch.compile, the just-in-time loader)
#   install    the other install paths on torch 2.14.1: a plain `pip install .` and a built
#              wheel, each in a fresh venv
#   gpu-env    the lent GPUs' software (Python 3.12, torch 2.11.0, triton 3.6.0): Triton
#              interpreter tests, sm_90 compile checks, the GPU check's CPU dry run
#              (scripts/gpu_env_check.sh)
# Each install path runs scripts/check_fast_path.py in two processes in a row, each with its own
# empty extension cache: the C++ backend must be there, and the second process's first call must
# take under 30 s (it loads the first one's build; nothing waits on a lock).
#   scripts/test_matrix.sh [torch214] [install] [gpu-env]      (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
TORCH_COMPAT=${FASTCONTRAST_COMPAT_TORCH:-torch==2.14.1}
COMPAT_TESTS=(tests/losses/test_info_nce.py tests/losses/test_clip_loss.py
              tests/losses/test_nt_xent.py tests/losses/test_supcon.py
              tests/losses/test_moco_loss.py tests/losses/test_siglip.py
              tests/losses/contract/test_compile.py tests/losses/contract/test_modules.py
              tests/losses/test_import_cost.py tests/compat tests/kernels/test_jit_build_lock.py
              tests/kernels/test_cpu_extension.py)
SECOND_CALL_LIMIT_S=30
TIERS=("$@")
[ ${#TIERS[@]} -eq 0 ] && TIERS=(torch214 install gpu-env)

say() { echo "== test_matrix: $* ($(date +%H:%M:%S))"; }

# check_install VENV: two processes in a row, outside the source tree, one fresh extension cache.
check_install() {
  local venv=$1 cache
  cache=$(mktemp -d)
  say "$venv: first process (may compile the extension just in time)"
  (cd "$cache" && TORCH_EXTENSIONS_DIR="$cache/ext" "$ROOT/$venv/bin/python" \
     "$ROOT/scripts/check_fast_path.py")
  say "$venv: second process (first call under ${SECOND_CALL_LIMIT_S} s)"
  (cd "$cache" && TORCH_EXTENSIONS_DIR="$cache/ext" "$ROOT/$venv/bin/python" \
     "$ROOT/scripts/check_fast_path.py" --max-first-call-s "$SECOND_CALL_LIMIT_S")
  rm -rf "$cache"
}

# fresh_venv DIR: a new virtual environment with the compatibility torch and nothing else.
fresh_venv() {
  rm -rf "$1"
  "$PYTHON" -m venv "$1"
  "$1/bin/python" -m pip --disable-pip-version-check -q install "$TORCH_COMPAT"
}

# clean_copy DIR: the tracked (and untracked, not ignored) files of this checkout, nothing built:
# the editable install compiles its fastcontrast/_C there, not over the main .venv's.
clean_copy() {
  rm -rf "$1"
  mkdir -p "$1"
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"
  done | xargs -0 cp --parents -t "$1"
}

tier_torch214() {
  local src=$ROOT/build/compat-src venv=$ROOT/.venv-torch2.14
  clean_copy "$src"
  say "torch214: editable install with the extension ahead of time ($TORCH_COMPAT)"
  (cd "$src" && FASTCONTRAST_VENV=$venv FASTCONTRAST_TORCH_SPEC=$TORCH_COMPAT ./scripts/setup.sh)
  (cd "$src" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "${COMPAT_TESTS[@]}")
  check_install .venv-torch2.14
}

tier_install() {
  local src=$ROOT/build/install-src  # its own copy: the torch214 tier's may be stale or built
  clean_copy "$src"
  say "install: plain pip install . in a fresh venv ($TORCH_COMPAT)"
  fresh_venv .venv-compat-plain
  .venv-compat-plain/bin/python -m pip --disable-pip-version-check -q install "$src"
  check_install .venv-compat-plain

  say "install: a built wheel in a fresh venv ($TORCH_COMPAT)"
  local dist
  dist=$(mktemp -d)
  fresh_venv .venv-compat-wheel
  .venv-compat-wheel/bin/python -m pip --disable-pip-version-check -q wheel --no-deps \
    -w "$dist" "$src"
  .venv-compat-wheel/bin/python - "$dist"/fastcontrast-*.whl <<'PY'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["fastcontrast/csrc/bindings.cpp", "fastcontrast/csrc/cpu/lse_tiles.h",
        "fastcontrast/csrc/cuda/queue.cu", "fastcontrast/distributed/api.py",
        "fastcontrast/kernels/infonce.py"]
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"the wheel lacks {missing}")
print(f"wheel: {len(names)} files, C++/CUDA sources included")
PY
  .venv-compat-wheel/bin/python -m pip --disable-pip-version-check -q install "$dist"/fastcontrast-*.whl
  check_install .venv-compat-wheel
  rm -rf "$dist"
}

tier_gpu_env() {
  say "gpu-env: Python 3.12, torch 2.11.0, triton 3.6.0"
  ./scripts/gpu_env_check.sh
}

for tier in "${TIERS[@]}"; do
  case "$tier" in
    torch214) tier_torch214 ;;
    install) tier_install ;;
    gpu-env) tier_gpu_env ;;
    *) echo "unknown tier $tier (torch214, install, gpu-env)" >&2; exit 2 ;;
  esac
done
say "all tiers passed: ${TIERS[*]}"
