"""Loader and thin Python surface of the C++ CPU kernels (csrc/bindings.cpp, csrc/cpu/*.cpp).

The compiled module is found in this order:
  1. ``fastcontrast._C``, built ahead of time by setup.py
     (``pip install --no-build-isolation -e .``);
  2. a just-in-time build of the same sources with the same flags (torch.utils.cpp_extension.load,
     module "fastcontrast_cpu", cached in torch's extension directory or FASTCONTRAST_BUILD_DIR);
  3. nothing: ``load_extension()`` warns once and returns None, and callers use the pure-PyTorch
     backend. Importing this module never compiles anything and never fails.

FASTCONTRAST_DISABLE_EXTENSION=1 makes ``load_extension()`` return None (to test the fallback).

The kernels compute, for s_ij = alpha_i * beta_j * <q_i, keys_j> with entry (i, j) masked iff
``exclude_diag and j == i + diag_offset`` or ``row_ids[i] == col_ids[j] >= 0``, the row (and column) log-sum-exp and the gradient of
sum_i row_grad_i * row_lse_i (+ sum_j col_grad_j * col_lse_j) with respect to q and keys. Inputs
are CPU tensors of one dtype in SUPPORTED_DTYPES; alpha / beta carry the normalisation and the
temperature, so q and keys are passed raw (PREFERS_PRENORMALIZED is False).
"""
import glob
import importlib
import os
import threading
import warnings

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64)  # the host upcasts fp16 / bf16 before calling
PREFERS_PRENORMALIZED = False  # raw q / keys, with alpha_i = (1/tau)/||q_i||, beta_j = 1/||k_j||

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

    repo_root = _repo_root()
    sources = _sources()
    missing = [path for path in sources if not os.path.isfile(path)]
    if missing or len(sources) < 2:
        raise FileNotFoundError("the C++ sources (csrc/) are not shipped with this installation")
    cflags, ldflags = cpu_extension_flags()
    build_dir = os.environ.get("FASTCONTRAST_BUILD_DIR") or None
    if build_dir is not None:
        os.makedirs(build_dir, exist_ok=True)
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


def _require():
    module = load_extension()
    if module is None:
        raise RuntimeError("fastcontrast C++ CPU extension is not available; check "
                           "fastcontrast._ext.available() first. " + _HOW_TO_FIX)
    return module


def _opt(tensor):
    return None if tensor is None else tensor.contiguous()


def masked_lse_forward(q, keys, alpha, beta, *, exclude_diag=False, diag_offset=0, row_ids=None,
                       col_ids=None, with_col_lse=False, block_rows=0):
    """(row_lse (N,), col_lse (M,) or None) in q's dtype; -inf for a row/column with no entry.

    q (N, D), keys (M, D), alpha (N,), beta (M,): CPU, one dtype of SUPPORTED_DTYPES.
    block_rows: rows per score tile (0 = automatic)."""
    return _require().masked_lse_forward(
        q.contiguous(), keys.contiguous(), alpha.contiguous(), beta.contiguous(),
        exclude_diag=bool(exclude_diag), diag_offset=int(diag_offset), row_ids=_opt(row_ids),
        col_ids=_opt(col_ids), with_col_lse=bool(with_col_lse), block_rows=int(block_rows))


def masked_lse_backward(q, keys, alpha, beta, row_lse, row_grad, col_lse=None, col_grad=None, *,
                        exclude_diag=False, diag_offset=0, row_ids=None, col_ids=None,
                        need_dq=True, need_dkeys=True, block_rows=0):
    """(dq or None, dkeys or None), recomputing the scores.

    dS_ij = row_grad_i exp(s_ij - row_lse_i) + col_grad_j exp(s_ij - col_lse_j) (second term only
    with col_lse / col_grad), 0 where masked; an lse of -inf contributes 0. row_lse may exceed
    this kernel's own lse (a global lse merged with other terms).
    dq_i = alpha_i sum_j dS_ij beta_j keys_j, dkeys_j = beta_j sum_i dS_ij alpha_i q_i."""
    return _require().masked_lse_backward(
        q.contiguous(), keys.contiguous(), alpha.contiguous(), beta.contiguous(),
        row_lse.contiguous(), row_grad.contiguous(), _opt(col_lse), _opt(col_grad),
        exclude_diag=bool(exclude_diag), diag_offset=int(diag_offset), row_ids=_opt(row_ids),
        col_ids=_opt(col_ids), need_dq=bool(need_dq), need_dkeys=bool(need_dkeys),
        block_rows=int(block_rows))


def masked_lse_forward_with_grad(q, keys, alpha, beta, row_grad, *, exclude_diag=False,
                                 diag_offset=0, row_ids=None, col_ids=None, extra_lse=None,
                                 need_dq=True, need_dkeys=True, block_rows=0):
    """(row_lse, dq or None, dkeys or None) in one pass over the scores, without recompute.

    row_lse = logaddexp(this kernel's row lse, extra_lse) (extra_lse (N,) optional, may hold -inf);
    dq / dkeys are those of masked_lse_backward with that row_lse and no column term."""
    return _require().masked_lse_forward_with_grad(
        q.contiguous(), keys.contiguous(), alpha.contiguous(), beta.contiguous(),
        row_grad.contiguous(), exclude_diag=bool(exclude_diag), diag_offset=int(diag_offset),
        row_ids=_opt(row_ids), col_ids=_opt(col_ids), extra_lse=_opt(extra_lse), need_dq=bool(need_dq), need_dkeys=bool(need_dkeys),
        block_rows=int(block_rows))
