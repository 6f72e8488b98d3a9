"""Triton kernels, one module per op (imported lazily by hydra_kernels.ops so CPU use never needs triton)."""
