"""Tests of the public losses: one file per loss (test_<loss>.py: its backends against the float64
reference, its own numerics cases, its module twin, its bad input), the properties they all
share in contract/, each run over the registry of the losses in _cases.py."""
