"""Drop-in classes with the signatures of the losses people already train with.

Each peer library has one module here whose classes take the peer's exact constructor and
forward arguments, defaults and return conventions, and compute with fastcontrast's fused
losses::

    from fastcontrast.compat.open_clip import ClipLoss     # was: from open_clip.loss import ...
    from fastcontrast.compat.lightly import NTXentLoss     # was: from lightly.loss import ...
    from fastcontrast.compat.pytorch_metric_learning import SupConLoss
    from fastcontrast.compat.info_nce import InfoNCE

Or, leaving a training script untouched, replace the peer's classes in its own modules::

    import fastcontrast.compat
    fastcontrast.compat.patch("open_clip")      # open_clip.loss.ClipLoss is now fastcontrast's
    ...
    fastcontrast.compat.unpatch("open_clip")    # the peer's own classes again

Options a peer offers that fastcontrast cannot compute raise ``NotImplementedError`` naming the
option when the object is built or called; none is silently ignored.
"""
import importlib
import sys

__all__ = ["PEERS", "patch", "unpatch", "patched"]

#: peer name -> the fastcontrast module holding its drop-in classes. Each such module defines
#: ``PATCH_TARGETS``: {"<peer module>": {"<class name>": <drop-in class>, ...}, ...}.
PEERS = {
    "open_clip": "fastcontrast.compat.open_clip",
    "lightly": "fastcontrast.compat.lightly",
    "pytorch_metric_learning": "fastcontrast.compat.pytorch_metric_learning",
    "info_nce": "fastcontrast.compat.info_nce",
}

# peer -> list of (module, attribute name, the peer's original object) replaced by patch()
_replaced = {}


def _compat_module(peer):
    if peer not in PEERS:
        raise ValueError(f"peer must be one of {sorted(PEERS)}, got {peer!r}")
    return importlib.import_module(PEERS[peer])


def patch(peer):
    """Replace ``peer``'s loss classes by fastcontrast's drop-in classes, in place.

    The class is replaced in its defining module (``open_clip.loss.ClipLoss``) and in every
    already-imported module of the peer's package that bound the same object by name
    (``from .loss import ClipLoss`` in ``open_clip/__init__.py`` and ``open_clip/factory.py``), so
    code that looks the class up either way gets the drop-in. Modules of the peer imported after
    the call read the defining module's attribute and get it too. Patching twice is a no-op;
    ``unpatch`` restores every replaced attribute. Objects built before the call are not touched.
    """
    if peer in _replaced:
        return
    targets = _compat_module(peer).PATCH_TARGETS
    replaced = []
    for module_name, classes in targets.items():
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ImportError(f"patch({peer!r}) needs {module_name}, which failed to import: "
                              f"{error}") from error
        for name, drop_in in classes.items():
            original = getattr(module, name)
            if original is drop_in:
                continue
            package = module_name.split(".")[0]
            for loaded_name, loaded in list(sys.modules.items()):
                if loaded is None or not (loaded_name == package
                                          or loaded_name.startswith(package + ".")):
                    continue
                for attribute, value in list(vars(loaded).items()):
                    if value is original:
                        setattr(loaded, attribute, drop_in)
                        replaced.append((loaded, attribute, original))
    _replaced[peer] = replaced


def unpatch(peer=None):
    """Undo ``patch(peer)`` (every patched peer when ``peer`` is None); a no-op if not patched."""
    peers = list(_replaced) if peer is None else [peer]
    for name in peers:
        if name not in PEERS:
            raise ValueError(f"peer must be one of {sorted(PEERS)}, got {name!r}")
        for module, attribute, original in reversed(_replaced.pop(name, [])):
            setattr(module, attribute, original)


def patched():
    """The peers currently patched, in the order they were patched."""
    return tuple(_replaced)
