"""fastcontrast.compat.patch / unpatch on a stand-in peer package (no peer needed)."""
import sys
import types

import pytest

import fastcontrast.compat as compat


class _PeerLoss:
    pass


class _DropInLoss:
    pass


@pytest.fixture
def stand_in_peer(monkeypatch):
    """A package 'peerpkg' whose loss module defines _PeerLoss, re-exported by two modules."""
    package = types.ModuleType("peerpkg")
    loss = types.ModuleType("peerpkg.loss")
    factory = types.ModuleType("peerpkg.factory")
    unrelated = types.ModuleType("otherpkg")
    loss.PeerLoss = package.PeerLoss = factory.PeerLoss = unrelated.PeerLoss = _PeerLoss
    factory.Alias = _PeerLoss  # bound under another name: replaced too
    for module in (package, loss, factory, unrelated):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    drop_ins = types.ModuleType("stand_in_compat")
    drop_ins.PATCH_TARGETS = {"peerpkg.loss": {"PeerLoss": _DropInLoss}}
    monkeypatch.setitem(sys.modules, "stand_in_compat", drop_ins)
    monkeypatch.setitem(compat.PEERS, "peerpkg", "stand_in_compat")
    yield package, loss, factory, unrelated
    compat.unpatch("peerpkg")


def test_patch_replaces_every_binding_in_the_peer_package(stand_in_peer):
    package, loss, factory, unrelated = stand_in_peer
    compat.patch("peerpkg")
    assert compat.patched() == ("peerpkg",)
    assert loss.PeerLoss is package.PeerLoss is factory.PeerLoss is _DropInLoss
    assert factory.Alias is _DropInLoss
    assert unrelated.PeerLoss is _PeerLoss  # other packages are left alone


def test_patch_twice_then_unpatch_restores_the_originals(stand_in_peer):
    package, loss, factory, _ = stand_in_peer
    compat.patch("peerpkg")
    compat.patch("peerpkg")
    compat.unpatch("peerpkg")
    assert compat.patched() == ()
    assert loss.PeerLoss is package.PeerLoss is factory.PeerLoss is factory.Alias is _PeerLoss
    compat.unpatch("peerpkg")  # not patched: a no-op


def test_unknown_peer_is_refused_by_name():
    with pytest.raises(ValueError, match="peer must be one of .*got 'nope'"):
        compat.patch("nope")
    with pytest.raises(ValueError, match="got 'nope'"):
        compat.unpatch("nope")


def test_missing_peer_module_names_it(monkeypatch):
    drop_ins = types.ModuleType("stand_in_compat")
    drop_ins.PATCH_TARGETS = {"no_such_peer_pkg.loss": {"Loss": _DropInLoss}}
    monkeypatch.setitem(sys.modules, "stand_in_compat", drop_ins)
    monkeypatch.setitem(compat.PEERS, "absent", "stand_in_compat")
    with pytest.raises(ImportError, match="needs no_such_peer_pkg.loss"):
        compat.patch("absent")
    assert compat.patched() == ()
