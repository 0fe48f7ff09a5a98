"""fastcontrast/_config.py: every FASTCONTRAST_* variable parsed in one place, once."""
import dataclasses
import os
import pathlib

import pytest
import torch

import fastcontrast as fc
from fastcontrast import _config

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_unset_and_empty_variables_keep_the_defaults():
    assert _config.from_environ({}) == _config.Settings()
    assert _config.from_environ({"FASTCONTRAST_GRAM": " "}) == _config.Settings()


@pytest.mark.parametrize("name, raw, value", [
    ("disable_extension", "1", True), ("gram", "0", False), ("shared_shift", "0", False),
    ("poison_outputs", "1", True), ("triton_autotune", "1", True), ("portable_build", "1", True),
    ("gram_block_rows", "16", 16), ("torch_chunk_elements", "4096", 4096),
    ("triton_config", "2", 2), ("build_lock_timeout_s", "0.5", 0.5),
    ("build_dir", "/tmp/x y", "/tmp/x y")])
def test_each_variable_sets_its_field(name, raw, value):
    parsed = _config.from_environ({f"FASTCONTRAST_{name.upper()}": raw})
    assert getattr(parsed, name) == value
    assert dataclasses.replace(parsed, **{name: getattr(_config.Settings(), name)}) == \
        _config.Settings()


@pytest.mark.parametrize("variable, raw, expected", [
    ("FASTCONTRAST_GRAM", "yes", "0 or 1"),
    ("FASTCONTRAST_SHARED_SHIFT", "2", "0 or 1"),
    ("FASTCONTRAST_GRAM_BLOCK_ROWS", "-4", "a non-negative number"),
    ("FASTCONTRAST_TORCH_CHUNK_ELEMENTS", "0", "a positive integer"),
    ("FASTCONTRAST_TRITON_CONFIG", "first", "a non-negative number"),
    ("FASTCONTRAST_BUILD_LOCK_TIMEOUT_S", "inf", "a non-negative number")])
def test_a_malformed_variable_is_refused_naming_it(variable, raw, expected):
    with pytest.raises(ValueError, match=f"{variable} must be {expected}, got '{raw}'"):
        _config.from_environ({variable: raw})


def test_a_bad_override_names_the_setting():
    with pytest.raises(ValueError, match="gram_block_rows must be a non-negative number"):
        with _config.override(gram_block_rows=-1):
            pass
    with pytest.raises(TypeError):
        with _config.override(no_such_setting=1):
            pass


def test_override_applies_within_the_block_only():
    before = _config.settings()
    with _config.override(gram=False, torch_chunk_elements=64) as inside:
        assert _config.settings() is inside
        assert (inside.gram, inside.torch_chunk_elements) == (False, 64)
    assert _config.settings() == before


def test_the_extension_gets_the_settings_on_attach_and_at_every_override(monkeypatch):
    received = []

    class Extension:
        @staticmethod
        def set_runtime_options(shared_shift, poison_outputs):
            received.append((shared_shift, poison_outputs))

    monkeypatch.setattr(_config, "_extension", None)
    with _config.override(shared_shift=False):
        _config.attach_extension(Extension)
        with _config.override(poison_outputs=True):
            pass
    _config.attach_extension(object())  # an extension without options: nothing to do
    assert received == [(False, False), (False, True), (False, False), (True, False)]


class _NoLibraryVariables(dict):
    def get(self, key, default=None):
        assert not key.startswith("FASTCONTRAST_"), f"{key} read on a hot path"
        return super().get(key, default)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_loss_calls_read_no_environment(backend, monkeypatch):
    if backend not in fc.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} unavailable here")
    z1, z2 = torch.randn(2, 6, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    monkeypatch.setattr(os, "environ", _NoLibraryVariables(os.environ))
    losses = [fc.info_nce(z1, z2, backend=backend), fc.nt_xent(z1, z2, backend=backend),
              fc.clip_loss(z1, z2, 10.0, backend=backend),
              fc.supcon(z1, labels, backend=backend),
              fc.siglip_loss(z1, z2, 10.0, -5.0, backend=backend)]
    torch.stack(losses).sum().backward()


def test_every_variable_is_documented():
    table = (ROOT / "docs" / "configuration.md").read_text()
    for field in dataclasses.fields(_config.Settings):
        assert f"FASTCONTRAST_{field.name.upper()}" in table
