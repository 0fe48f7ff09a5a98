"""The lock file of a just-in-time build (fastcontrast/_jit_lock.py): torch.utils.cpp_extension
waits for ``<build dir>/lock`` without a timeout, so one left by a build killed midway must not
make later loads wait forever. torch's own load runs here on a temporary build directory with
its compile and its module import replaced (nothing is built: each test takes well under 2 s),
and a FileBaton that fails instead of waiting on an existing lock."""

import os
import re
import threading
import time
import types
import warnings

import pytest
from torch.utils import cpp_extension
from torch.utils._cpp_extension_versioner import ExtensionVersioner
from torch.utils.file_baton import FileBaton

from fastcontrast import _cuda_ext, _ext

TIMEOUT_ENV = "FASTCONTRAST_BUILD_LOCK_TIMEOUT_S"


class _NoWaitBaton(FileBaton):
    def wait(self):
        if os.path.exists(self.lock_file_path):
            raise AssertionError(f"torch would wait on {self.lock_file_path} without a timeout")


@pytest.fixture
def jit(monkeypatch, tmp_path):
    """A fresh loader state (restored after the test) whose builds compile nothing, in
    FASTCONTRAST_BUILD_DIR = tmp_path; ``built``: the names torch asked to compile."""
    built = []
    module = types.SimpleNamespace(**{name: None for name in _ext._EXPECTED})
    monkeypatch.setattr(cpp_extension, "FileBaton", _NoWaitBaton)
    monkeypatch.setattr(cpp_extension, "JIT_EXTENSION_VERSIONER", ExtensionVersioner())
    monkeypatch.setattr(cpp_extension, "_write_ninja_file_and_build_library",
                        lambda **kwargs: built.append(kwargs["name"]))
    monkeypatch.setattr(cpp_extension, "_import_module_from_library",
                        lambda name, build_directory, is_python_module: module)
    monkeypatch.setattr(_ext, "_import_prebuilt", lambda: None)
    for name, value in (("_module", None), ("_tried", False), ("_warned", False)):
        monkeypatch.setattr(_ext, name, value)
    monkeypatch.setenv("FASTCONTRAST_BUILD_DIR", str(tmp_path))
    monkeypatch.delenv("FASTCONTRAST_DISABLE_EXTENSION", raising=False)
    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    return types.SimpleNamespace(lock=tmp_path / "lock", module=module, built=built)


def _lock(path, age_s):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    then = time.time() - age_s
    os.utime(path, (then, then))


@pytest.mark.parametrize("timeout, age_s", [(None, 601.0), ("5", 10.0)],
                         ids=["default_600s", "env_5s"])
def test_stale_lock_is_removed_with_a_warning(jit, monkeypatch, timeout, age_s):
    if timeout is not None:
        monkeypatch.setenv(TIMEOUT_ENV, timeout)
    _lock(jit.lock, age_s)
    with pytest.warns(RuntimeWarning, match=re.escape(str(jit.lock))):
        module = _ext.load_extension()
    assert module is jit.module
    assert jit.built == [_ext.JIT_MODULE_NAME]
    assert not jit.lock.exists()  # torch's baton was taken and released


def test_live_lock_is_waited_for_then_falls_back_as_a_failed_build(jit, monkeypatch):
    """A young lock (a build running now) is left alone: wait at most the limit, then the
    fallback of a failed build (None, one warning saying why)."""
    monkeypatch.setenv(TIMEOUT_ENV, "0.3")
    _lock(jit.lock, 0.0)
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match=r"unavailable \(TimeoutError: .*"
                                            + re.escape(str(jit.lock))):
        assert _ext.load_extension() is None
    assert 0.3 <= time.monotonic() - start < 1.5
    assert jit.lock.exists() and jit.built == []


def test_lock_released_while_waiting_then_loads(jit, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "5")
    _lock(jit.lock, 0.0)
    timer = threading.Timer(0.2, os.remove, [str(jit.lock)])  # the other build finishes
    timer.start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # neither a stale-lock warning nor a fallback
            assert _ext.load_extension() is jit.module
    finally:
        timer.cancel()
    assert jit.built == [_ext.JIT_MODULE_NAME]


def test_bad_timeout_falls_back_naming_the_variable(jit, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "soon")
    _lock(jit.lock, 601.0)
    with pytest.warns(RuntimeWarning, match=rf"{TIMEOUT_ENV} must be a non-negative number of "
                                            r"seconds, got 'soon'"):
        assert _ext.load_extension() is None
    assert jit.lock.exists()


def test_cuda_loader_removes_a_stale_lock(jit):
    """The CUDA extension's build directory (FASTCONTRAST_BUILD_DIR/cuda) gets the same care."""
    lock = jit.lock.parent / "cuda" / "lock"
    _lock(lock, 601.0)
    with pytest.warns(RuntimeWarning, match=re.escape(str(lock))):
        assert _cuda_ext._build() is jit.module
    assert not lock.exists()
