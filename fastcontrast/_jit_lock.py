"""The lock file of a just-in-time build directory (torch.utils.cpp_extension.load), shared by
the loaders of the compiled modules (fastcontrast._ext, fastcontrast._cuda_ext).

torch serialises the builds in one directory with a FileBaton: the first process creates
``<build dir>/lock``, builds and removes it; every other process waits for the file to go, with
no timeout. A build killed midway (Ctrl-C, out of memory, a job's time limit) leaves the file
behind and every later load waits forever. torch writes no owner into the file, so whether its
creator is still alive cannot be known; its age is the signal:

    clear_stale_lock(build_dir), before load:
        no lock                          -> nothing to do
        a lock older than the limit      -> removed, with a warning naming it
        a younger one (a build running)  -> wait until it goes, at most the limit, then
                                            TimeoutError (the loaders fall back as after a
                                            failed build)
    the limit: FASTCONTRAST_BUILD_LOCK_TIMEOUT_S seconds (default 600; read at every call).
"""
import math
import os
import time
import warnings

__all__ = ["TIMEOUT_ENV", "DEFAULT_TIMEOUT_S", "lock_timeout_s", "build_directory",
           "clear_stale_lock"]

TIMEOUT_ENV = "FASTCONTRAST_BUILD_LOCK_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
LOCK_NAME = "lock"  # the file of torch.utils.cpp_extension's FileBaton in the build directory


def lock_timeout_s():
    """The limit in seconds from FASTCONTRAST_BUILD_LOCK_TIMEOUT_S (default 600); ValueError
    naming the variable unless it is a finite number >= 0."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{TIMEOUT_ENV} must be a non-negative number of seconds, got {raw!r}")
    return value


def build_directory(name, configured):
    """The directory torch builds module ``name`` in: ``configured`` (created if missing) or
    torch's default for that name (TORCH_EXTENSIONS_DIR or its cache); None where this torch
    does not say (load then picks it, unchecked)."""
    if configured:
        os.makedirs(configured, exist_ok=True)
        return configured
    from torch.utils import cpp_extension

    default = getattr(cpp_extension, "_get_build_directory", None)
    return None if default is None else default(name, verbose=False)


def _age_s(path):
    """Seconds since ``path`` was last modified; None when it does not exist."""
    try:
        return time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return None


def clear_stale_lock(build_dir, *, poll_s=0.05):
    """Make sure torch's load in ``build_dir`` will not wait on a lock forever (see the module
    docstring): returns once no lock is left, raises TimeoutError if a live one outlasts the
    limit. ``build_dir`` None: nothing to check."""
    if build_dir is None:
        return
    limit = lock_timeout_s()
    path = os.path.join(build_dir, LOCK_NAME)
    age = _age_s(path)
    if age is None:
        return
    if age > limit:
        try:
            os.remove(path)
        except FileNotFoundError:  # another process removed it first
            return
        warnings.warn(f"fastcontrast: removed the stale build lock {path} ({age:.0f} s old, "
                      f"over {TIMEOUT_ENV} = {limit:g} s): a build killed midway left it",
                      RuntimeWarning, stacklevel=2)
        return
    deadline = time.monotonic() + limit
    while os.path.exists(path):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the build lock {path} is still there after {limit:g} s "
                               f"({TIMEOUT_ENV}): another process is building in that "
                               "directory, or a build killed midway left it (remove it then)")
        time.sleep(min(poll_s, left))
