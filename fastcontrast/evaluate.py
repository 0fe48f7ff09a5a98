"""Old path of ``fastcontrast.methods.evaluate`` (linear probe, kNN and baselines of frozen
features), kept as an alias for one release: import from ``fastcontrast.methods.evaluate``
instead."""
from .methods.evaluate import *  # noqa: F401,F403
