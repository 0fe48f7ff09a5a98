"""Loader of the C++ CPU kernels (csrc/bindings.cpp, csrc/cpu/*.cpp).

The compiled module is found in this order:
  1. ``fastcontrast._C``, built ahead of time by setup.py
     (``pip install --no-build-isolation -e .``);
  2. a just-in-time build of the same sources with the same flags (torch.utils.cpp_extension.load,
     module "fastcontrast_cpu", cached in torch's extension directory or FASTCONTRAST_BUILD_DIR);
  3. nothing: ``load_extension()`` warns once and returns None, and callers use the pure-PyTorch
     backend. Importing this module never compiles anything and never fails.

FASTCONTRAST_DISABLE_EXTENSION=1 makes ``load_extension()`` return None (to test the fallback).
A build lock left in the build directory by a build killed midway is removed once older than
FASTCONTRAST_BUILD_LOCK_TIMEOUT_S (fastcontrast._jit_lock), so that no load waits forever.

The module's entry points are called only by the kernels of the registered ops
(fastcontrast/infonce.py, siglip.py, momentum.py), through fastcontrast.backends.kernels.
"""
import glob
import importlib
import os
import threading
import warnings

JIT_MODULE_NAME = "fastcontrast_cpu"
_EXPECTED = ("masked_lse_forward", "masked_lse_backward", "masked_lse_forward_with_grad")
_HOW_TO_FIX = ("To get the fast path, install a C++ compiler and ninja, then reinstall with "
               "`pip install --no-build-isolation -e .` (or let it compile just in time on "
               "first use).")

_lock = threading.Lock()
_module = None
_tried = False
_warned = False


def _disabled():
    return os.environ.get("FASTCONTRAST_DISABLE_EXTENSION", "") == "1"


def _warn_once(reason):
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"fastcontrast: the C++ CPU extension is unavailable ({reason}); "
                      f"falling back to the pure-PyTorch backend. {_HOW_TO_FIX}", RuntimeWarning,
                      stacklevel=3)


def _has_entry_points(module):
    return all(hasattr(module, name) for name in _EXPECTED)


def _repo_root():
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sources():
    """The C++ sources next to this package (a source checkout or an editable install)."""
    from fastcontrast._build_flags import cpu_extension_sources

    return cpu_extension_sources(_repo_root())


def _import_prebuilt():
    """fastcontrast._C if it was built ahead of time and is not older than the sources beside
    it (an editable install after a C++ edit: the just-in-time build then compiles the edit)."""
    try:
        module = importlib.import_module("fastcontrast._C")
    except Exception:  # noqa: BLE001 - not built, built for another torch, ...
        return None
    if not _has_entry_points(module):
        return None
    try:
        built = os.path.getmtime(module.__file__)
        headers = glob.glob(os.path.join(_repo_root(), "csrc", "cpu", "*.h"))
        if any(os.path.getmtime(path) > built for path in _sources() + headers
               if os.path.isfile(path)):
            return None
    except (OSError, TypeError):
        pass
    return module


def _build_just_in_time():
    """Compiles csrc/ with the flags of setup.py (cached after the first build)."""
    from torch.utils import cpp_extension

    from fastcontrast._build_flags import cpu_extension_flags
    from fastcontrast._jit_lock import build_directory, clear_stale_lock

    repo_root = _repo_root()
    sources = _sources()
    missing = [path for path in sources if not os.path.isfile(path)]
    if missing or len(sources) < 2:
        raise FileNotFoundError("the C++ sources (csrc/) are not shipped with this installation")
    cflags, ldflags = cpu_extension_flags()
    build_dir = build_directory(JIT_MODULE_NAME, os.environ.get("FASTCONTRAST_BUILD_DIR"))
    clear_stale_lock(build_dir)
    return cpp_extension.load(name=JIT_MODULE_NAME, sources=sources, extra_cflags=cflags,
                              extra_ldflags=ldflags,
                              extra_include_paths=[os.path.join(repo_root, "csrc")],
                              build_directory=build_dir, verbose=False)


def load_extension():
    """The compiled module, or None (warns once) when it can neither be imported nor built."""
    global _module, _tried
    if _disabled():
        _warn_once("disabled by FASTCONTRAST_DISABLE_EXTENSION=1")
        return None
    if _tried:
        return _module
    with _lock:
        if not _tried:
            module, reason = _import_prebuilt(), None
            if module is None:
                try:
                    module = _build_just_in_time()
                except Exception as error:  # noqa: BLE001 - compiler, ninja, sources, linker...
                    module, reason = None, f"{type(error).__name__}: {str(error).strip()[:500]}"
            _module, _tried = module, True
            if module is None:
                _warn_once(reason)
    return _module


def available():
    """True when the extension imports or builds; never raises."""
    try:
        return load_extension() is not None
    except Exception:  # noqa: BLE001
        return False
