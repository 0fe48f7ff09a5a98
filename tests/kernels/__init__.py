"""Tests of the kernel layer: the masked-LSE contract on every backend; C++, Triton, CUDA."""
