"""Kernels: `triton/` (@triton.jit kernels and their launch helpers) and `cuda` (the csrc extension), plus what
every backend shares: `kl` (the KL estimators' names, mode ids and torch formulas) and `layout` (the stream row
split).

No autograd here; hydra_kernels.ops wraps these.
"""
