#!/usr/bin/env bash
# The compatibility tiers CI runs after the full suite (scripts/test.sh), each in environments of
# its own beside the main .venv:
#   torch214   torch 2.14.1 (a CUDA build that runs on the CPU): editable install with the
#              extension built ahead of time, the compatibility subset of the tests (every loss
#              on every CPU backend, torch.compile, the just-in-time loader)
#   install    the other install paths on torch 2.14.1: a plain `pip install .`, then (that
#              uninstalled) a built wheel, in one fresh venv
#   gpu-env    the lent GPUs' software (Python 3.12, torch 2.11.0, triton 3.6.0): Triton
#              interpreter tests, sm_90 compile checks, the GPU check's CPU dry run
#              (scripts/gpu_env_check.sh)
# Each install path runs scripts/check_fast_path.py in two processes in a row, each with its own
# empty extension cache: the C++ backend must be there, and the second process's first call must
# take under 30 s (it loads the first one's build; nothing waits on a lock).
# Each CUDA build of torch takes 5-6 GB installed. Each tier checks the free disk space first and
# fails at once, saying how much it needs, when there is not enough. With
# FASTCONTRAST_MATRIX_REMOVE_ENVS=1 (.ci/run sets it) a tier that passes removes the
# environments and source copies it made, so that the tiers never hold more than one CUDA
# torch at a time.
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

# need_disk GB TIER: fail now, with the numbers, unless GB gigabytes are free here.
need_disk() {
  local free_gb
  free_gb=$(df -Pk . | awk 'NR == 2 {print int($4 / 1048576)}')
  say "$2: ${free_gb} GB free on this disk, ${1} GB needed"
  if [ "$free_gb" -lt "$1" ]; then
    echo "test_matrix: the $2 tier needs ${1} GB of free disk (a CUDA build of torch and its" \
         "libraries), only ${free_gb} GB are free" >&2
    exit 1
  fi
}

# done_with PATH...: remove what a passed tier built, when FASTCONTRAST_MATRIX_REMOVE_ENVS=1.
done_with() {
  if [ "${FASTCONTRAST_MATRIX_REMOVE_ENVS:-0}" = 1 ]; then
    rm -rf "$@"
    say "removed $*"
  fi
}

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
  need_disk 7 torch214
  clean_copy "$src"
  say "torch214: editable install with the extension ahead of time ($TORCH_COMPAT)"
  (cd "$src" && FASTCONTRAST_VENV=$venv FASTCONTRAST_TORCH_SPEC=$TORCH_COMPAT ./scripts/setup.sh)
  (cd "$src" && "$venv/bin/python" -m pytest -q -p no:cacheprovider "${COMPAT_TESTS[@]}")
  check_install .venv-torch2.14
  done_with "$venv" "$src"
}

tier_install() {
  local src=$ROOT/build/install-src  # its own copy: the torch214 tier's may be stale or built
  local venv=.venv-compat-install dist
  need_disk 7 install
  clean_copy "$src"
  # One fresh venv for both paths (torch installed once): the plain install is checked, then
  # uninstalled before the wheel goes in; each check has its own empty extension cache.
  say "install: plain pip install . in a fresh venv ($TORCH_COMPAT)"
  fresh_venv "$venv"
  "$venv/bin/python" -m pip --disable-pip-version-check -q install "$src"
  check_install "$venv"
  "$venv/bin/python" -m pip --disable-pip-version-check -q uninstall -y fastcontrast

  say "install: a built wheel in the same venv, fastcontrast uninstalled ($TORCH_COMPAT)"
  dist=$(mktemp -d)
  "$venv/bin/python" -m pip --disable-pip-version-check -q wheel --no-deps -w "$dist" "$src"
  "$venv/bin/python" - "$dist"/fastcontrast-*.whl <<'PY'
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
  "$venv/bin/python" -m pip --disable-pip-version-check -q install "$dist"/fastcontrast-*.whl
  check_install "$venv"
  rm -rf "$dist"
  done_with "$venv" "$src"
}

tier_gpu_env() {
  say "gpu-env: Python 3.12, torch 2.11.0, triton 3.6.0"
  # The downloaded CUDA wheels (~3 GB) sit beside the ~5 GB installed while pip works.
  [ -x .venv-gpu/bin/python ] || need_disk 9 gpu-env
  ./scripts/gpu_env_check.sh
  done_with .venv-gpu
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
