"""Old path of ``fastcontrast.methods.encoders`` (the reference methods' small encoders), kept as
an alias for one release: import from ``fastcontrast.methods.encoders`` instead."""
from .methods.encoders import *  # noqa: F401,F403
