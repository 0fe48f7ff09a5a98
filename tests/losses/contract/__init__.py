"""The properties every public loss shares, each over the loss registry (tests/losses/_cases.py)."""
