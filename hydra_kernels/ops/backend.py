"""Which implementation runs an op: `torch` (plain PyTorch, the CPU path), `triton`, or `cuda` (csrc).

Order of precedence: the op's `backend=` argument, then the HYDRA_KERNELS_BACKEND environment variable,
then `auto`. `auto` picks `torch` for CPU tensors and a GPU kernel for CUDA tensors (per-op rules decide
between Triton and CUDA where both exist). `triton` on CPU tensors needs TRITON_INTERPRET=1 set before
triton is imported (that is how the tests run the kernels without a GPU).
"""
from __future__ import annotations

import os

import torch

from hydra_kernels.kernels.triton import triton_interpreting

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "HYDRA_KERNELS_BACKEND"


def requested_backend(backend: str | None) -> str:
    choice = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    choice = choice.lower()
    if choice != "auto" and choice not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source}: unknown backend {choice!r} (expected 'auto' or one of {BACKENDS})")
    return choice


def choose_backend(backend: str | None, device: torch.device, *, gpu_default: str = "triton",
                   available: tuple[str, ...] = BACKENDS) -> str:
    """Resolve the backend for an op whose inputs live on `device`.

    `gpu_default` is what `auto` picks on CUDA (an op's shape rule may pass "cuda");
    `available` lists the backends the op implements.
    """
    choice = requested_backend(backend)
    if choice == "auto":
        choice = gpu_default if device.type == "cuda" else "torch"
        if choice not in available:
            choice = "triton" if device.type == "cuda" and "triton" in available else "torch"
        return choice
    if choice not in available:
        raise ValueError(f"backend: {choice!r} is not implemented for this op (available: {available})")
    if choice == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError("backend: 'triton' on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported")
    if choice == "cuda" and device.type != "cuda":
        raise ValueError(f"backend: 'cuda' needs CUDA tensors, got tensors on {device}")
    return choice
