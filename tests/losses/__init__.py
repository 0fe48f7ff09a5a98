"""Tests of the public losses against the float64 reference, torch.compile and the meta device."""
