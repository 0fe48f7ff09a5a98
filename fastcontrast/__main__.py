"""``python -m fastcontrast ...``: the same command line as the ``fastcontrast`` console script."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
