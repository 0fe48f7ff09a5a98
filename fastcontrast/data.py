"""Old path of ``fastcontrast.methods.data`` (the reference methods' data sets and augmentations),
kept as an alias for one release: import from ``fastcontrast.methods.data`` instead."""
from .methods.data import *  # noqa: F401,F403
