"""The lock of a just-in-time build directory (fastcontrast/_jit_build.py): no load waits
forever, whichever lock this torch uses (an advisory flock on ``<build dir>/lock`` from torch
2.14 on, the file's existence before). torch's own load runs here on a temporary build directory
with its compile and its module import replaced (nothing is built: each test takes well under
2 s); the mechanism-specific rules are also tested directly on both mechanisms."""

import fcntl
import io
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

from fastcontrast import _config, _cuda_ext, _ext, _jit_build

TIMEOUT_ENV = "FASTCONTRAST_BUILD_LOCK_TIMEOUT_S"
ADVISORY = _jit_build.torch_lock_is_advisory()


class _NoWaitBaton(FileBaton):
    def wait(self):
        if os.path.exists(self.lock_file_path):
            raise AssertionError(f"torch would wait on {self.lock_file_path} without a timeout")


@pytest.fixture
def jit(monkeypatch, configure, tmp_path):
    """A fresh loader state (restored after the test) whose builds compile nothing, in
    FASTCONTRAST_BUILD_DIR = tmp_path; ``built``: the names torch asked to compile."""
    built = []
    module = types.SimpleNamespace(**{name: None for name in _ext._EXPECTED})
    if not ADVISORY:  # torch < 2.14: a baton that fails instead of waiting forever
        monkeypatch.setattr(cpp_extension, "FileBaton", _NoWaitBaton)
    monkeypatch.setattr(cpp_extension, "JIT_EXTENSION_VERSIONER", ExtensionVersioner())
    monkeypatch.setattr(cpp_extension, "_write_ninja_file_and_build_library",
                        lambda **kwargs: built.append(kwargs["name"]))
    monkeypatch.setattr(cpp_extension, "_import_module_from_library",
                        lambda name, build_directory, is_python_module: module)
    monkeypatch.setattr(_ext, "_import_prebuilt", lambda: None)
    for name, value in (("_module", None), ("_tried", False), ("_warned", False)):
        monkeypatch.setattr(_ext, name, value)
    # A load attaches its (fake) module to the settings: restore the real one afterwards.
    monkeypatch.setattr(_config, "_extension", _config._extension)
    configure(build_dir=str(tmp_path), disable_extension=False, build_lock_timeout_s=600.0)
    return types.SimpleNamespace(lock=tmp_path / "lock", module=module, built=built)


def _require_baton():
    if ADVISORY:
        pytest.skip("this torch locks with flock: the baton rules are tested directly below")


def _lock(path, age_s):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    then = time.time() - age_s
    os.utime(path, (then, then))


@pytest.mark.parametrize("timeout, age_s", [(None, 601.0), ("5", 10.0)],
                         ids=["default_600s", "env_5s"])
def test_stale_lock_is_removed_with_a_warning(jit, configure, timeout, age_s):
    _require_baton()
    if timeout is not None:
        configure(build_lock_timeout_s=float(timeout))
    _lock(jit.lock, age_s)
    with pytest.warns(RuntimeWarning, match=re.escape(str(jit.lock))):
        module = _ext.load_extension()
    assert module is jit.module
    assert jit.built == [_ext.JIT_MODULE_NAME]
    assert not jit.lock.exists()  # torch's baton was taken and released


def test_live_lock_is_waited_for_then_falls_back_as_a_failed_build(jit, configure):
    """A young lock (a build running now) is left alone: wait at most the limit, then the
    fallback of a failed build (None, one warning saying why)."""
    _require_baton()
    configure(build_lock_timeout_s=0.3)
    _lock(jit.lock, 0.0)
    start = time.monotonic()
    with pytest.warns(RuntimeWarning, match=r"unavailable \(TimeoutError: .*"
                                            + re.escape(str(jit.lock))):
        assert _ext.load_extension() is None
    assert 0.3 <= time.monotonic() - start < 1.5
    assert jit.lock.exists() and jit.built == []


def test_lock_released_while_waiting_then_loads(jit, configure):
    _require_baton()
    configure(build_lock_timeout_s=5)
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


@pytest.mark.parametrize("raw", ["soon", "-1", "nan"])
def test_bad_timeout_is_refused_naming_the_variable(raw):
    with pytest.raises(ValueError, match=rf"{TIMEOUT_ENV} must be a non-negative number, "
                                         rf"got '{raw}'"):
        _config.from_environ({TIMEOUT_ENV: raw})


def test_cuda_loader_removes_a_stale_lock(jit):
    """The CUDA extension's build directory (FASTCONTRAST_BUILD_DIR/cuda) gets the same care."""
    _require_baton()
    lock = jit.lock.parent / "cuda" / "lock"
    _lock(lock, 601.0)
    with pytest.warns(RuntimeWarning, match=re.escape(str(lock))):
        assert _cuda_ext._build() is jit.module
    assert not lock.exists()


def _reset_loader(monkeypatch):
    for name, value in (("_module", None), ("_tried", False), ("_warned", False)):
        monkeypatch.setattr(_ext, name, value)
    # A load attaches its (fake) module to the settings: restore the real one afterwards.
    monkeypatch.setattr(_config, "_extension", _config._extension)


def test_second_load_after_a_build_does_not_wait(jit, monkeypatch, configure):
    """The lock file torch leaves after a finished build (torch >= 2.14 keeps it, unlocked) is
    no build in progress: the next process's load neither waits nor warns."""
    configure(build_lock_timeout_s=30)
    assert _ext.load_extension() is jit.module
    _reset_loader(monkeypatch)  # as a new process would start
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.load_extension() is jit.module
    assert time.monotonic() - start < 2.0


@pytest.fixture
def advisory(monkeypatch, tmp_path):
    """The flock mechanism of torch >= 2.14, whatever torch is installed; ``hold()`` takes the
    lock as another builder would (an open file description of its own)."""
    monkeypatch.setattr(_jit_build, "torch_lock_is_advisory", lambda: True)
    path = tmp_path / "lock"
    held = []

    def hold():
        fd = os.open(path, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        held.append(fd)
        return fd

    yield types.SimpleNamespace(dir=str(tmp_path), path=path, hold=hold)
    for fd in held:
        os.close(fd)


def test_advisory_lock_file_left_unlocked_is_ignored(advisory, configure):
    configure(build_lock_timeout_s=600)
    _lock(advisory.path, 10_000.0)  # old and present: still no build in progress
    start = time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _jit_build.clear_stale_lock(advisory.dir)
    assert time.monotonic() - start < 0.5
    assert advisory.path.exists()  # torch's file is left for torch
    assert not _jit_build.lock_is_held(str(advisory.path))


def test_advisory_lock_held_is_waited_for_then_times_out(advisory, configure):
    configure(build_lock_timeout_s=0.3)
    advisory.hold()
    assert _jit_build.lock_is_held(str(advisory.path))
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=re.escape(str(advisory.path))):
        _jit_build.clear_stale_lock(advisory.dir)
    assert 0.3 <= time.monotonic() - start < 1.5


def test_advisory_lock_released_while_waiting(advisory, configure):
    configure(build_lock_timeout_s=5)
    fd = advisory.hold()
    timer = threading.Timer(0.2, fcntl.flock, [fd, fcntl.LOCK_UN])  # the other build ends
    timer.start()
    try:
        start = time.monotonic()
        _jit_build.clear_stale_lock(advisory.dir)
        assert time.monotonic() - start < 2.0
    finally:
        timer.cancel()


def test_lock_is_held_on_a_missing_file_is_false(tmp_path):
    assert not _jit_build.lock_is_held(str(tmp_path / "absent"))
    assert not (tmp_path / "absent").exists()


def test_baton_rules_on_any_torch(monkeypatch, tmp_path, configure):
    """The file-existence rules (torch < 2.14), forced on whatever torch is installed."""
    monkeypatch.setattr(_jit_build, "torch_lock_is_advisory", lambda: False)
    configure(build_lock_timeout_s=0.3)
    path = tmp_path / "lock"
    _lock(path, 10.0)
    with pytest.warns(RuntimeWarning, match="stale build lock"):
        _jit_build.clear_stale_lock(str(tmp_path))
    assert not path.exists()
    _lock(path, 0.0)
    with pytest.raises(TimeoutError):
        _jit_build.clear_stale_lock(str(tmp_path))


def test_compile_notice_only_when_a_compile_is_due(tmp_path):
    source = tmp_path / "kernel.cpp"
    source.write_text("// source")
    stream = io.StringIO()
    with _jit_build.compile_notice("C++ CPU kernels", "mod", str(tmp_path), [str(source)],
                                   stream=stream):
        pass
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "compiling the C++ CPU kernels" in lines[0]
    assert str(tmp_path) in lines[0] and "compiled the C++ CPU kernels in" in lines[1]
    built = tmp_path / "mod_v1.so"
    built.write_text("")
    later = time.time() + 5
    os.utime(built, (later, later))
    stream = io.StringIO()
    with _jit_build.compile_notice("C++ CPU kernels", "mod", str(tmp_path), [str(source)],
                                   stream=stream):
        pass
    assert stream.getvalue() == ""
