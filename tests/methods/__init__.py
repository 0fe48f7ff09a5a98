"""Tests of the reference methods with their data, encoders, evaluation and trainer."""
