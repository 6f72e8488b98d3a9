"""Kernels: `triton/` (@triton.jit kernels and their launch helpers) and `cuda` (the csrc extension).

No autograd here; hydra_kernels.ops wraps these.
"""
