"""How many threads torch's CPU kernels use in a run (run.threads).

A tiny model's matrices (the demo's: hidden 64) gain nothing from being split over threads, and OpenMP's worker
threads spin while they wait for each other: when another process holds one of the cores, every parallel region
waits for a descheduled thread. Measured on a shared 2-core machine (load 3–5), one demo-sized training step took
93–102 ms with 1 thread and 1451 ms with torch's default 2 (118 ms with OMP_WAIT_POLICY=PASSIVE: the spinning is
the cause). So on the CPU a small model runs on one thread unless run.threads says otherwise; larger models
keep torch's default, where splitting a GEMM pays.
"""
from __future__ import annotations

import torch

# Below this many parameters a model counts as tiny (the demo's ~0.2M; GPT-2 small is 124M).
TINY_PARAMETERS = 20_000_000


def choose_threads(threads: int | None, device: torch.device, model: torch.nn.Module | None) -> int | None:
    """The thread count to set: `threads` (run.threads) when given; else 1 for a tiny model on the CPU; else None
    (leave torch's own)."""
    if threads is not None:
        return threads
    if device.type != "cpu" or model is None:
        return None
    if sum(p.numel() for p in model.parameters()) < TINY_PARAMETERS:
        return 1
    return None


def set_threads(threads: int | None, device: torch.device, model: torch.nn.Module | None) -> int:
    """torch.set_num_threads(choose_threads(...)) when that is not None (a process-wide setting); returns the
    count in effect."""
    n = choose_threads(threads, torch.device(device), model)
    if n is not None and n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()


__all__ = ["choose_threads", "set_threads", "TINY_PARAMETERS"]
