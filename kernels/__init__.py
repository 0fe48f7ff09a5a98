"""Triton kernels of fastcontrast, one op family per module (installed as fastcontrast.kernels)."""
