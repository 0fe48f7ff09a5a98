"""Tests of NegativeQueue and momentum_update."""
