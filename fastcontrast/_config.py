"""Every ``FASTCONTRAST_*`` environment variable the library reads, read here once, at import.

The rest of the package asks ``settings()`` (an attribute read, no environment lookup on the hot
paths). Tests and benchmarks change a setting for a block with ``override(name=value)``, which
also hands the C++ extension its options (``_C.set_runtime_options``, once the loader attached
it). docs/configuration.md describes each variable; setup.py imports this file on its own for
the build-time ones, before the package can be imported.
"""
import dataclasses
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

__all__ = ["Settings", "from_environ", "settings", "override", "attach_extension",
           "ENV_PREFIX"]

ENV_PREFIX = "FASTCONTRAST_"


@dataclass(frozen=True)
class Settings:
    """The library's settings; each field is ``FASTCONTRAST_<FIELD NAME IN UPPER CASE>``.

    disable_extension     no C++ CPU extension: neither loaded nor compiled (fastcontrast/_ext.py)
    build_dir             directory of the just-in-time builds (None: torch's default)
    build_lock_timeout_s  seconds a just-in-time load waits for a held build lock
    portable_build        compile the extension without -march=native
    gram                  NT-Xent / SupCon / self-excluding info_nce take the symmetric-Gram ops
    gram_block_rows       row-block size of the Gram kernels (0: the kernel picks)
    shared_shift          the C++ kernels' one-exp shared-shift passes (False: exact passes only)
    poison_outputs        kernel outputs are NaN-filled first, so unwritten elements fail tests
    serial_host_ops       a C++-backend loss runs its host ATen passes on the calling thread alone
                          (fastcontrast/_host_threads.py: faster on a busy CPU)
    torch_chunk_elements  score elements per row chunk of the torch backend (None: by device)
    triton_autotune       the Triton InfoNCE backward autotunes over its configs on a GPU
    triton_config         pins config i of that set (None: the first, or autotuning)
    """
    disable_extension: bool = False
    build_dir: Optional[str] = None
    build_lock_timeout_s: float = 600.0
    portable_build: bool = False
    gram: bool = True
    gram_block_rows: int = 0
    shared_shift: bool = True
    poison_outputs: bool = False
    serial_host_ops: bool = True
    torch_chunk_elements: Optional[int] = None
    triton_autotune: bool = False
    triton_config: Optional[int] = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            problem = _problem(field.name, value)
            if problem:
                raise ValueError(f"{field.name} must be {problem}, got {value!r}")


_NON_NEGATIVE = ("build_lock_timeout_s", "gram_block_rows", "triton_config")


def _problem(field, value):
    """What ``value`` of ``field`` should be, or None when it is fine."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if field == "torch_chunk_elements":
        return None if isinstance(value, int) and value > 0 else "a positive integer"
    if field in _NON_NEGATIVE and not (math.isfinite(value) and value >= 0):
        return "a non-negative number"
    return None


def _env_name(field):
    return ENV_PREFIX + field.upper()


def _parse(field, raw):
    """The value of ``field`` from its variable's text; ValueError naming the variable."""
    kind = Settings.__dataclass_fields__[field].type
    if kind in (bool, "bool"):
        value = {"0": False, "1": True}.get(raw, ValueError)
        expected = "0 or 1"
    elif kind in (Optional[str], "Optional[str]"):
        return raw
    else:
        number = float if kind in (float, "float") else int
        try:
            value = number(raw)
        except ValueError:
            value = ValueError
        expected = _problem(field, -1) or "a number"
    if value is ValueError or (value is not ValueError and _problem(field, value)):
        raise ValueError(f"{_env_name(field)} must be {expected}, got {raw!r}")
    return value


def from_environ(environ=None):
    """Settings from ``environ`` (default os.environ): unset or empty variables keep the
    defaults; a malformed value raises ValueError naming the variable."""
    environ = os.environ if environ is None else environ
    values = {}
    for field in dataclasses.fields(Settings):
        raw = environ.get(_env_name(field.name), "").strip()
        if raw:
            values[field.name] = _parse(field.name, raw)
    return Settings(**values)


_current = from_environ()


def settings():
    """The settings in force (from the environment at import, or an ``override``)."""
    return _current


_extension = None  # the loaded C++ extension (attach_extension), or None


def attach_extension(module):
    """Called by the loader (fastcontrast/_ext.py) with the C++ extension it loaded (or None):
    the extension gets the settings its kernels read now, and again at every override."""
    global _extension
    _extension = module
    _sync_extension()


def _sync_extension():
    if callable(getattr(_extension, "set_runtime_options", None)):
        _extension.set_runtime_options(_current.shared_shift, _current.poison_outputs)


@contextmanager
def override(**changes):
    """Within the block, ``settings()`` has ``changes`` (field names of Settings) applied."""
    global _current
    previous = _current
    _current = dataclasses.replace(_current, **changes)
    try:
        _sync_extension()
        yield _current
    finally:
        _current = previous
        _sync_extension()
