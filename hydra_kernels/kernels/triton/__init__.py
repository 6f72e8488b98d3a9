"""Triton kernels, one module per op (imported lazily by hydra_kernels.ops so CPU use never needs triton).

This package file itself imports no triton: hydra_kernels.ops.backend reads triton_interpreting() from here.
"""

import contextlib
import os

import torch

__all__ = ["device_guard", "triton_interpreting", "on_interpreter"]


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton then runs kernels in its interpreter on CPU tensors (the variable
    must be set before triton is imported, as tests/conftest.py does)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_interpreter(t: torch.Tensor) -> bool:
    """A launch on t runs in the interpreter (t is no CUDA tensor), where the launchers pick small tiles."""
    return t.device.type != "cuda"


def device_guard(t: torch.Tensor):
    """Make t's GPU the current device for a launch: Triton launches on the current device and its current
    stream, whatever device the pointers live on (tensors on cuda:1 with cuda:0 current would fault).
    A no-op context for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
