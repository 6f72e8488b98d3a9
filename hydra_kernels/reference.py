"""Plain PyTorch ground truth for every op. Tests compare kernels against these in float64.

Nothing here is fast, and nothing here is clever: each function is the math as written in the docs.
Call with float64 tensors for ground truth; autograd through these gives the reference gradients.
"""
from __future__ import annotations

from typing import Sequence

import torch


def split_streams(rows: int, n_streams: int) -> list[slice]:
    """Rows are split into `n_streams` equal contiguous blocks, stream s = rows [s*m, (s+1)*m)."""
    m = rows // n_streams
    return [slice(s * m, (s + 1) * m) for s in range(n_streams)]


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                scaling: Sequence[float], stream_adapters: Sequence[int]) -> torch.Tensor:
    """y = x·Wᵀ + b (+ scaling[a]·(x·A[a]ᵀ)·B[a]ᵀ for streams whose adapter a ≥ 0).

    x: [..., K]; weight: [N, K]; bias: [N] or None; lora_A: [n, r, K]; lora_B: [n, N, r];
    scaling: one float per adapter; stream_adapters: one adapter index per stream, −1 for the base.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    outs = []
    for s, rows in enumerate(split_streams(x2.shape[0], len(stream_adapters))):
        xs = x2[rows]
        ys = xs @ weight.T
        if bias is not None:
            ys = ys + bias
        a = stream_adapters[s]
        if a >= 0:
            ys = ys + scaling[a] * ((xs @ lora_A[a].T) @ lora_B[a].T)
        outs.append(ys)
    return torch.cat(outs, 0).reshape(*lead, weight.shape[0])
