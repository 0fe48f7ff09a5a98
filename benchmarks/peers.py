"""The libraries fastcontrast is compared with, loaded so that only their loss modules run.

    cls, reason = load_peer("lightly")        # (the loss class, None) or (None, why it is skipped)

Install them with the ``bench`` extra (``pip install -e ".[bench]"``) or ``scripts/setup.sh
--bench``. Two of them, lightly and open-clip-torch, import torchvision (and, for OpenCLIP, timm
and the whole model zoo) from their package ``__init__``, and the torchvision wheel does not load
beside every torch build (a CPU torch 2.13.0 fails with "operator torchvision::nms does not
exist"). Their loss modules do not use torchvision, so when the plain import fails they are
loaded with two documented shims, in the benchmark's own worker process only:

1. ``import_skipping_package_inits``: the parent packages of the loss module (``lightly``,
   ``lightly.loss``, ``lightly.models``, ...) are created as empty namespace-like modules, so
   their ``__init__.py`` files (the model zoo) are not executed; the loss module and the modules
   it imports run unchanged from the installed files.
2. ``torchvision_placeholder``: where torchvision itself cannot be imported, ``torchvision`` and
   its submodules are placeholder modules; every name imported from them is a placeholder that
   raises when it is called, so a code path that really needed torchvision fails loudly instead
   of computing something else. (lightly's ``models/utils.py`` imports ``StochasticDepth`` at
   module level but its NT-Xent loss never calls it.)

Whatever is loaded, the benchmark checks each peer's loss value against fastcontrast's
reference before timing it, so a shim that changed the computation could not go unnoticed.
"""
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from dataclasses import dataclass


@dataclass(frozen=True)
class Peer:
    """One library: its PyPI name, the module that holds the loss, and the loss's name there."""

    distribution: str
    module: str
    attribute: str
    shim: bool  # may need the import shims above (its package __init__ imports torchvision)
    twin: str = None  # its drop-in class in fastcontrast.compat: "<module>.<class>"


PEERS = {
    "info-nce-pytorch": Peer("info-nce-pytorch", "info_nce", "InfoNCE", False,
                             "info_nce.InfoNCE"),
    "open_clip ClipLoss": Peer("open-clip-torch", "open_clip.loss", "ClipLoss", True,
                               "open_clip.ClipLoss"),
    "open_clip SigLipLoss": Peer("open-clip-torch", "open_clip.loss", "SigLipLoss", True,
                                 "open_clip.SigLipLoss"),
    # Its twin, compat.open_clip.DistillClipLoss, is not listed (the compat suite's calls
    # take no teacher); objectives_targets.py times its fused equivalent, distill_clip_loss.
    "open_clip DistillClipLoss": Peer("open-clip-torch", "open_clip.loss", "DistillClipLoss",
                                      True),
    "lightly": Peer("lightly", "lightly.loss.ntx_ent_loss", "NTXentLoss", True,
                    "lightly.NTXentLoss"),
    "pml NTXentLoss": Peer("pytorch-metric-learning", "pytorch_metric_learning.losses",
                           "NTXentLoss", False, "pytorch_metric_learning.NTXentLoss"),
    "pml SupConLoss": Peer("pytorch-metric-learning", "pytorch_metric_learning.losses",
                           "SupConLoss", False, "pytorch_metric_learning.SupConLoss"),
}

INSTALL_HINT = 'install the peers with `pip install -e ".[bench]"` or `scripts/setup.sh --bench`'


def installed(key):
    """None if the peer's top-level package is installed, else why it is skipped (no import)."""
    peer = PEERS[key]
    top = peer.module.split(".")[0]
    if importlib.util.find_spec(top) is None:
        return f"{peer.distribution} is not installed ({INSTALL_HINT})"
    return None


def version(key):
    """The installed version of the peer's distribution, or None."""
    from importlib import metadata

    try:
        return metadata.version(PEERS[key].distribution)
    except metadata.PackageNotFoundError:
        return None


def load_peer(key):
    """(the peer's loss class, None), or (None, the reason it cannot be used here)."""
    peer = PEERS[key]
    reason = installed(key)
    if reason is not None:
        return None, reason
    try:
        module = _import_restoring_on_failure(peer.module)
    except Exception as plain_error:  # noqa: BLE001 - any import-time failure of the peer
        if not peer.shim:
            return None, f"import {peer.module} failed: {type(plain_error).__name__}: {plain_error}"
        try:
            if not _torchvision_loads():
                torchvision_placeholder()
            module = import_skipping_package_inits(peer.module)
        except Exception as error:  # noqa: BLE001
            return None, (f"import {peer.module} failed ({type(plain_error).__name__}: "
                          f"{plain_error}), and through the shim too: "
                          f"{type(error).__name__}: {error}")
    try:
        return getattr(module, peer.attribute), None
    except AttributeError:
        return None, f"{peer.module} {version(key)} has no {peer.attribute}"


def load_twin(key):
    """(fastcontrast.compat's drop-in class for the peer, None), or (None, why it is absent)."""
    if PEERS[key].twin is None:
        return None, f"fastcontrast.compat has no twin of {key}"
    module_name, attribute = PEERS[key].twin.rsplit(".", 1)
    try:
        module = importlib.import_module(f"fastcontrast.compat.{module_name}")
    except ImportError as error:
        return None, f"fastcontrast.compat.{module_name} failed to import: {error}"
    if not hasattr(module, attribute):
        return None, f"fastcontrast.compat.{module_name} has no {attribute}"
    return getattr(module, attribute), None


def _import_restoring_on_failure(name):
    """importlib.import_module, removing the modules a failed import left half-initialised."""
    before = set(sys.modules)
    try:
        return importlib.import_module(name)
    except BaseException:
        for added in set(sys.modules) - before:
            del sys.modules[added]
        raise


def _torchvision_loads():
    try:
        _import_restoring_on_failure("torchvision")
        return True
    except Exception:  # noqa: BLE001 - e.g. "operator torchvision::nms does not exist"
        return False


class _PackageWithoutInit(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds the packages under ``root`` as empty modules with the right ``__path__`` (so their
    submodules import normally, but no package ``__init__.py`` runs)."""

    def __init__(self, root):
        self.root = root

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.root and not fullname.startswith(self.root + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.submodule_search_locations is None:
            return None  # a plain module: the normal finders load it
        return importlib.util.spec_from_loader(fullname, self, is_package=True)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        parent = sys.modules.get(module.__name__.rpartition(".")[0])
        search = parent.__path__ if parent is not None and module.__name__ != self.root else None
        real = importlib.machinery.PathFinder.find_spec(module.__name__, search)
        module.__path__ = list(real.submodule_search_locations)


def import_skipping_package_inits(name):
    """Import module ``name`` without executing the ``__init__.py`` of its packages (nor of the
    packages of its own imports under the same top-level package)."""
    root = name.split(".")[0]
    finder = _PackageWithoutInit(root)
    sys.meta_path.insert(0, finder)
    try:
        return _import_restoring_on_failure(name)
    finally:
        sys.meta_path.remove(finder)


class _Placeholder:
    """Stands for a torchvision object that could not be imported; using it raises."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision could not be imported here; this placeholder stands in "
                           "for it (fastcontrast.benchmarks.peers) and must not be used")


class _PlaceholderModule(types.ModuleType):
    def __getattr__(self, attribute):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return type(attribute, (_Placeholder,), {})


class _PlaceholderFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _PlaceholderModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def torchvision_placeholder():
    """Make ``import torchvision[.x]`` give placeholder modules in this process (see above)."""
    if not any(isinstance(f, _PlaceholderFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PlaceholderFinder())
