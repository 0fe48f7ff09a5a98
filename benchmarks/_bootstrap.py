"""Make ``fastcontrast.benchmarks`` importable when a file of this folder is run as a script.

An install (``pip install -e .``) maps this folder to ``fastcontrast.benchmarks``. A script run
from a checkout (``python benchmarks/core_targets.py``), or an install made before the folder
became a subpackage, does not have that mapping: ``ensure_package()`` then imports the checkout's
``fastcontrast`` (from the folder above, if it is not installed) and registers this folder as
its ``benchmarks`` subpackage."""
import importlib
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
NAME = "fastcontrast.benchmarks"


def ensure_package():
    """Import and return the ``fastcontrast.benchmarks`` package (this folder)."""
    if NAME in sys.modules:
        return sys.modules[NAME]
    try:
        import fastcontrast
    except ImportError:
        sys.path.insert(0, os.path.dirname(HERE))
        import fastcontrast
    try:
        return importlib.import_module(NAME)
    except ModuleNotFoundError as error:
        if error.name != NAME:
            raise
    spec = importlib.util.spec_from_file_location(
        NAME, os.path.join(HERE, "__init__.py"), submodule_search_locations=[HERE])
    package = importlib.util.module_from_spec(spec)
    sys.modules[NAME] = package
    spec.loader.exec_module(package)
    fastcontrast.benchmarks = package
    return package
