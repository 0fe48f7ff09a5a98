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
FASTCONTRAST_BUILD_LOCK_TIMEOUT_S (fastcontrast._jit_build), so that no load waits forever.

The module's entry points are called only by the kernels of the registered ops
(fastcontrast/infonce/ops.py, siglip.py, momentum.py), through fastcontrast.backends.kernels.
"""
import importlib
import threading
import warnings

from ._config import attach_extension, settings

JIT_MODULE_NAME = "fastcontrast_cpu"
_EXPECTED = ("masked_lse_forward", "masked_lse_backward", "masked_lse_forward_with_grad")
_HOW_TO_FIX = ("The fast path needs a C++ compiler (g++ or clang++) and ninja: with them "
               "installed it compiles just in time on the next first use (about 2 minutes, "
               "once), or ahead of time with `pip install --no-build-isolation .` beside torch.")

_lock = threading.Lock()
_module = None
_tried = False
_warned = False


def _disabled():
    return settings().disable_extension


def _warn_once(reason):
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(f"fastcontrast: the C++ CPU extension is unavailable ({reason}); "
                      f"falling back to the pure-PyTorch backend. {_HOW_TO_FIX}", RuntimeWarning,
                      stacklevel=3)


def _has_entry_points(module):
    return all(hasattr(module, name) for name in _EXPECTED)


def _csrc():
    from fastcontrast._build_flags import csrc_directory

    return csrc_directory()


def _sources_and_headers(csrc):
    from fastcontrast._build_flags import cpu_extension_headers, cpu_extension_sources

    return cpu_extension_sources(csrc), cpu_extension_headers(csrc)


def _import_prebuilt():
    """fastcontrast._C if it was built ahead of time and is not older than the sources beside
    it (an editable install after a C++ edit: the just-in-time build then compiles the edit)."""
    try:
        module = importlib.import_module("fastcontrast._C")
    except Exception:  # noqa: BLE001 - not built, built for another torch, ...
        return None
    if not _has_entry_points(module):
        return None
    from fastcontrast._jit_build import is_current

    csrc = _csrc()
    if csrc is not None:
        sources, headers = _sources_and_headers(csrc)
        try:
            if not is_current(module.__file__, sources + headers):
                return None
        except (OSError, TypeError):
            pass
    return module


def _build_just_in_time():
    """Compiles csrc/ with the flags of setup.py (cached after the first build)."""
    from torch.utils import cpp_extension

    from fastcontrast._build_flags import cpu_extension_flags
    from fastcontrast._jit_build import build_directory, clear_stale_lock, compile_notice

    csrc = _csrc()
    if csrc is None:
        raise FileNotFoundError(
            "this installation ships neither the compiled module fastcontrast._C nor the C++ "
            "sources (fastcontrast/csrc) to build it from")
    sources, headers = _sources_and_headers(csrc)
    cflags, ldflags = cpu_extension_flags()
    build_dir = build_directory(JIT_MODULE_NAME, settings().build_dir)
    clear_stale_lock(build_dir)
    with compile_notice("C++ CPU kernels", JIT_MODULE_NAME, build_dir, sources + headers):
        return cpp_extension.load(name=JIT_MODULE_NAME, sources=sources, extra_cflags=cflags,
                                  extra_ldflags=ldflags, extra_include_paths=[csrc],
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
            attach_extension(module)
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
