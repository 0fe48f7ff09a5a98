"""Tests of the benchmark harness and the command line."""
