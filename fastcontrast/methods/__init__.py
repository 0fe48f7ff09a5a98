"""Reference implementations of the classic contrastive methods on fastcontrast's losses.

One module per method; each defines a ``ContrastiveMethod`` subclass (see ``base.py``), a
``DEFAULTS`` dict (the data set and training settings ``fastcontrast train NAME`` uses) and
``build(backend="auto", **overrides)`` returning a ready method. Modules are imported lazily, so
``import fastcontrast`` stays light.
"""
import importlib

from .base import ContrastiveMethod

# name -> module of this package
METHODS = {
    "simclr": "simclr",
    "moco": "moco",
    "cpc": "cpc",
    "dim": "dim",
    "amdim": "amdim",
    "cmc": "cmc",
}


def method_module(name):
    """The module implementing method ``name`` (one of METHODS)."""
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {name!r}")
    return importlib.import_module(f".{METHODS[name]}", __name__)


def build(name, **kwargs):
    """``method_module(name).build(**kwargs)``."""
    return method_module(name).build(**kwargs)


__all__ = ["ContrastiveMethod", "METHODS", "method_module", "build"]
