"""Argument types and choice lists shared by the subcommands of the ``fastcontrast`` command."""
import argparse

from ..backends import LOSS_BACKENDS as BACKENDS  # noqa: F401  (the --backend choices)


def positive(kind):
    """An argparse type: ``kind(text)``, rejected unless > 0."""
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


positive_int = positive(int)


def csv_list(text):
    """An argparse type: the non-empty, stripped items of a comma-separated list."""
    return [item.strip() for item in text.split(",") if item.strip()]
