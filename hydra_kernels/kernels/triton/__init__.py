"""Triton kernels, one module per op (imported lazily by hydra_kernels.ops so CPU use never needs triton)."""

import contextlib

import torch


def device_guard(t: torch.Tensor):
    """Make t's GPU the current device for a launch: Triton launches on the current device and its current
    stream, whatever device the pointers live on (tensors on cuda:1 with cuda:0 current would fault).
    A no-op context for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
