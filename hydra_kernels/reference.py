"""Plain PyTorch ground truth for every op. Tests compare kernels against these in float64.

Nothing here is fast, and nothing here is clever: each function is the math as written in the docs.
Call with float64 tensors for ground truth; autograd through these gives the reference gradients.
It imports nothing of hydra_kernels (tests/test_imports.py checks): a formula shared with the ops could not
catch their mistakes, so the stream split and the KL estimators are derived here again.
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


# ------------------------------------------------------------------------------ log-probs, KL, entropy

def _log_softmax_stats(logits: torch.Tensor, temperature: float):
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    p = logp_all.exp()
    # 0·log 0 = 0: entries at −inf contribute nothing (xlogy-style), never NaN.
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return logp_all, p, entropy


def _gather(logp_all: torch.Tensor, targets: torch.Tensor, ignore_index: int):
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    return logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1), valid


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   ignore_index: int = -100) -> torch.Tensor:
    """log softmax(logits / T)[target] per token. logits [..., V], targets [...]; 0 where target == ignore_index."""
    logp_all = torch.log_softmax(logits / temperature, dim=-1)
    logp, valid = _gather(logp_all, targets, ignore_index)
    return torch.where(valid, logp, torch.zeros_like(logp))


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kl: str) -> torch.Tensor:
    """Sampled-token KL(π‖π_ref) estimators (Schulman's k1, k2, k3) from the two log-probs of the target,
    with r = π_ref(t) / π(t): k1 = −log r, k2 = (log r)² / 2, k3 = (r − 1) − log r."""
    log_r = ref_logp - logp
    if kl == "k1":
        return -log_r
    if kl == "k2":
        return 0.5 * log_r * log_r
    if kl == "k3":
        return torch.expm1(log_r) - log_r          # (r − 1) − log r without cancellation at r ≈ 1
    raise ValueError(f"kl: unknown sampled estimator {kl!r}")


def logprobs_and_kl(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0, kl: str = "k3", ignore_index: int = -100):
    """(actor log-prob, reference log-prob, per-token KL, actor entropy), each shaped like targets.

    kl: "k1" | "k2" | "k3" (sampled-token estimators) or "full" (exact Σ_v π(v)·(log π(v) − log π_ref(v))).
    All four are 0 where target == ignore_index. The reference is frozen (as in ops.logprobs_and_kl):
    ref_logits never receives a gradient.
    """
    logp_all, p, entropy = _log_softmax_stats(logits, temperature)
    ref_all = torch.log_softmax(ref_logits.detach() / temperature, dim=-1)
    logp, valid = _gather(logp_all, targets, ignore_index)
    ref_logp, _ = _gather(ref_all, targets, ignore_index)
    if kl == "full":
        k = torch.where(p > 0, p * (logp_all - ref_all), torch.zeros_like(p)).sum(-1)
    else:
        k = kl_estimate(logp, ref_logp, kl)
    zero = torch.zeros_like(logp)
    return tuple(torch.where(valid, t, zero) for t in (logp, ref_logp, k, entropy))


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                    kl: str | None = None, ignore_index: int = -100, bias: torch.Tensor | None = None):
    """The LM head fused with the log-probs: hidden [S, T, D] (S streams of the same tokens), weight [V, D],
    bias [V] or None (logits h·Wᵀ + b), targets [T]. Returns (logp [S, T], entropy [S, T], kl [T] between
    stream 0 (π) and stream 1 (π_ref) or None). Stream 1 is a constant in the KL (as in ops.linear_logprobs):
    KL's gradient reaches stream 0 only.
    """
    logits = hidden @ weight.T                                   # [S, T, V]
    if bias is not None:
        logits = logits + bias
    logp_all, p, entropy = _log_softmax_stats(logits, temperature)
    t = targets.unsqueeze(0).expand(hidden.shape[0], -1)
    logp, valid = _gather(logp_all, t, ignore_index)
    zero = torch.zeros_like(logp)
    logp, entropy = torch.where(valid, logp, zero), torch.where(valid, entropy, zero)
    k = None
    if kl is not None:
        if hidden.shape[0] < 2:
            raise ValueError("kl: needs at least two streams (stream 0 = policy, stream 1 = reference)")
        if kl == "full":
            k = torch.where(p[0] > 0, p[0] * (logp_all[0] - logp_all[1].detach()), torch.zeros_like(p[0])).sum(-1)
        else:
            k = kl_estimate(logp[0], logp[1].detach(), kl)
        k = torch.where(valid[0], k, zero[0])
    return logp, entropy, k
