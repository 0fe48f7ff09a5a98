"""Loader of the CUDA C++ kernels (csrc/cuda/: momentum.cu, queue.cu, cuda_bindings.cpp).

The module is compiled just in time on first use (torch.utils.cpp_extension.load, module
"fastcontrast_cuda", cached in torch's extension directory, or in FASTCONTRAST_BUILD_DIR/cuda when
that is set), and only where it can run: a CUDA build of torch, a visible GPU, and nvcc. Anything
else makes ``load_extension()`` return None and ``unavailable_reason()`` say why; importing this
module never compiles anything and never fails. Callers that ask for backend="cuda" explicitly get
a RuntimeError with that reason; "auto" never picks this backend.

Entry points of the compiled module (argument checks in cuda_bindings.cpp):
    momentum_update_(targets, onlines, weight)           one launch per call (one dtype pair)
    queue_enqueue_(dst, keys, pointer, count, pointer_buf, count_buf,
                   dst_labels=None, labels=None, dst_indices=None, indices=None)
        -> (new_pointer, new_count)
"""
import functools
import os

import torch

from ._config import settings

JIT_MODULE_NAME = "fastcontrast_cuda"
_HOW_TO_FIX = ("The CUDA backend needs a CUDA build of torch, a visible GPU and the CUDA toolkit "
               "(nvcc; set CUDA_HOME to it); use backend='triton' or 'torch' otherwise.")

def _sources():
    """(csrc directory, CUDA sources), or (None, []) when this installation ships none."""
    from fastcontrast._build_flags import csrc_directory, cuda_extension_sources

    csrc = csrc_directory()
    return (None, []) if csrc is None else (csrc, cuda_extension_sources(csrc))


def _why_not():
    """Why the extension cannot be built here, or None when it can be tried."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    csrc, sources = _sources()
    if csrc is None or not all(os.path.isfile(path) for path in sources) or len(sources) < 2:
        return "the CUDA sources (csrc/cuda/) are not shipped with this installation"
    return None


def _build():
    from torch.utils import cpp_extension

    from fastcontrast._build_flags import cuda_extension_headers
    from fastcontrast._jit_build import build_directory, clear_stale_lock, compile_notice

    csrc, sources = _sources()
    configured = settings().build_dir
    build_dir = build_directory(JIT_MODULE_NAME,
                                os.path.join(configured, "cuda") if configured else None)
    clear_stale_lock(build_dir)  # a build running elsewhere or killed midway: _jit_build
    headers = cuda_extension_headers(csrc)
    with compile_notice("CUDA kernels", JIT_MODULE_NAME, build_dir, sources + headers):
        return cpp_extension.load(name=JIT_MODULE_NAME, sources=sources,
                                  extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-std=c++17"],
                                  extra_include_paths=[csrc], build_directory=build_dir,
                                  verbose=False)


@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) or (None, why not); tried once per process."""
    reason = _why_not()
    if reason is not None:
        return None, reason
    try:
        return _build(), None
    except Exception as error:  # noqa: BLE001 - nvcc, compiler, linker, ...
        return None, f"{type(error).__name__}: {str(error).strip()[:500]}"


def load_extension():
    """The compiled module, or None when it cannot be built or loaded here (see
    ``unavailable_reason()``). The first call may take a minute (compilation); later calls and
    later processes reuse the cached build."""
    return _load()[0]


def available():
    """True when the CUDA extension is loaded or builds; never raises."""
    try:
        return load_extension() is not None
    except Exception:  # noqa: BLE001
        return False


def unavailable_reason():
    """Why ``load_extension()`` returned None (None when it did not)."""
    return _load()[1]


def require():
    """The compiled module, or a RuntimeError that says why it is unavailable and what to do."""
    module = load_extension()
    if module is None:
        raise RuntimeError(f"backend='cuda' is unavailable: {unavailable_reason()}. "
                           f"{_HOW_TO_FIX}")
    return module
