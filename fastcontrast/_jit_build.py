"""What the just-in-time loaders (fastcontrast._ext, fastcontrast._cuda_ext) share around
torch.utils.cpp_extension.load: the build directory, its lock, and the notice of a first compile.

The lock. torch serialises the builds in one directory through ``<build dir>/lock``, in one of two
ways depending on its version:

    advisory (torch >= 2.14)  an OS advisory lock (filelock: fcntl.flock) on the file; the file
                              stays after every build and means nothing by itself. The kernel
                              drops the lock when its holder dies, so it is never stale.
    baton (older torch)       a FileBaton: the file's existence is the lock; the builder removes
                              it when done. A build killed midway leaves it behind and every later
                              load would wait for it forever (torch has no timeout).

``clear_stale_lock(build_dir)``, called before load, makes sure the load cannot wait forever:

    advisory: the lock is free            -> nothing to do (the file is left alone)
              held (a build is running)   -> wait until it is free, at most the limit, then
                                             TimeoutError (the loaders fall back as after a failed
                                             build)
    baton:    no file                     -> nothing to do
              a file older than the limit -> removed, with a warning naming it
              a younger one               -> wait until it goes, at most the limit, then
                                             TimeoutError
    the limit: FASTCONTRAST_BUILD_LOCK_TIMEOUT_S seconds (default 600; read at every call).

The notice. A first compile takes minutes and torch's load prints nothing while it runs, so
``compile_notice`` says on stderr what is being compiled, where it is cached and how long it took,
whenever no build newer than the sources is in the build directory.
"""
import contextlib
import glob
import os
import sys
import time
import warnings

from ._config import settings

__all__ = ["TIMEOUT_ENV", "DEFAULT_TIMEOUT_S", "lock_timeout_s", "build_directory",
           "clear_stale_lock", "torch_lock_is_advisory", "lock_is_held", "is_current",
           "compile_notice"]

TIMEOUT_ENV = "FASTCONTRAST_BUILD_LOCK_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0
LOCK_NAME = "lock"  # the lock file torch.utils.cpp_extension.load uses in the build directory


def lock_timeout_s():
    """The limit in seconds, FASTCONTRAST_BUILD_LOCK_TIMEOUT_S (default 600; fastcontrast/_config.py
    checks it is a finite number >= 0)."""
    return settings().build_lock_timeout_s


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


def torch_lock_is_advisory():
    """True when this torch's load takes an advisory lock on the lock file (torch >= 2.14), False
    when the file's existence is the lock (its FileBaton)."""
    from torch.utils import cpp_extension

    return not hasattr(cpp_extension, "FileBaton")


def lock_is_held(path):
    """True when another open file description holds an advisory (flock) lock on ``path``; False
    when the file is missing, free, or this platform has no flock. Takes and drops the lock
    without blocking; creates nothing."""
    try:
        import fcntl
    except ImportError:  # no flock here (Windows): torch's own wait is all there is
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _age_s(path):
    """Seconds since ``path`` was last modified; None when it does not exist."""
    try:
        return time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return None


def _wait_while(busy, path, limit, poll_s):
    """Polls ``busy()`` until it is False; TimeoutError naming ``path`` after ``limit`` s."""
    deadline = time.monotonic() + limit
    while busy():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the build lock {path} is still held after {limit:g} s "
                               f"({TIMEOUT_ENV}): another process is building in that "
                               "directory")
        time.sleep(min(poll_s, left))


def clear_stale_lock(build_dir, *, poll_s=0.05):
    """Make sure torch's load in ``build_dir`` will not wait on a lock forever (see the module
    docstring): returns once the lock is free, raises TimeoutError if a live one outlasts the
    limit. ``build_dir`` None: nothing to check."""
    if build_dir is None:
        return
    limit = lock_timeout_s()
    path = os.path.join(build_dir, LOCK_NAME)
    if torch_lock_is_advisory():
        _wait_while(lambda: lock_is_held(path), path, limit, poll_s)
        return
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
    _wait_while(lambda: os.path.exists(path), path, limit, poll_s)


def is_current(built, inputs):
    """True when the file ``built`` exists and no file of ``inputs`` was modified after it."""
    try:
        when = os.path.getmtime(built)
    except OSError:
        return False
    return all(os.path.getmtime(path) <= when for path in inputs if os.path.isfile(path))


def _has_current_build(name, build_dir, inputs):
    """True when ``build_dir`` holds a compiled ``name`` (torch names it name.so or name_vK.so)
    newer than every file of ``inputs``."""
    if build_dir is None:
        return False
    built = glob.glob(os.path.join(build_dir, f"{name}.so")) + glob.glob(
        os.path.join(build_dir, f"{name}_v*.so"))
    return bool(built) and is_current(max(built, key=os.path.getmtime), inputs)


@contextlib.contextmanager
def compile_notice(what, name, build_dir, inputs, *, stream=None):
    """Around torch's load: when no current build of ``name`` is cached in ``build_dir`` (one
    newer than every file of ``inputs``), one line on ``stream`` (stderr) before the compile and
    one after it, so that a first use that takes minutes does not look hung."""
    stream = sys.stderr if stream is None else stream
    if _has_current_build(name, build_dir, inputs):
        yield
        return
    where = build_dir or "torch's extension cache"
    print(f"fastcontrast: compiling the {what} just in time (about 2 minutes on 2 cores, once "
          f"per torch version; cached in {where})...", file=stream, flush=True)
    start = time.monotonic()
    yield
    print(f"fastcontrast: compiled the {what} in {time.monotonic() - start:.0f} s",
          file=stream, flush=True)
