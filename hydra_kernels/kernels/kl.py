"""The KL(π ‖ π_ref) estimators: their names, the mode ids the kernels take, and the sampled-token formulas.

Sampled-token estimators (Schulman's k1, k2, k3) from the log-probs of the sampled token under both
policies, with d = log π_ref(t) − log π(t): k1 = −d, k2 = d²/2, k3 = e^d − 1 − d. "full" is the exact KL
summed over the vocabulary, which each op accumulates in its own vocabulary sweep. The torch backends of
ops.logprobs and ops.linear_logprobs take the sampled formulas and their derivatives from here; the Triton
kernels (kernels/triton/logprobs.py) and csrc/ (enum KlMode in csrc/hydra_kernels.h) spell the same formulas
and mode ids in their own languages. Every backend is checked against hydra_kernels.reference, which derives
its own.
"""
from __future__ import annotations

import torch

__all__ = ["SAMPLED_KL_ESTIMATORS", "KL_ESTIMATORS", "KL_MODES", "kl_mode", "sampled_kl", "sampled_kl_grad"]

SAMPLED_KL_ESTIMATORS = ("k1", "k2", "k3")
KL_ESTIMATORS = SAMPLED_KL_ESTIMATORS + ("full",)

# The kernels' KL_MODE (a compile-time constant): "none" means log-probs only, without a reference.
KL_MODES = {"none": 0, "k1": 1, "k2": 2, "k3": 3, "full": 4}


def kl_mode(kl: str) -> int:
    """The kernels' mode id of kl ("none" or one of KL_ESTIMATORS). Raises ValueError for any other value."""
    try:
        return KL_MODES[kl]
    except (KeyError, TypeError):
        raise ValueError(f"kl: unknown mode {kl!r} (expected one of {tuple(KL_MODES)})") from None


def sampled_kl(d: torch.Tensor, kl: str) -> torch.Tensor:
    """The sampled estimator `kl` ("k1" | "k2" | "k3") at d = ref_logp − logp (any shape, elementwise)."""
    if kl == "k1":
        return -d
    if kl == "k2":
        return 0.5 * d * d
    if kl == "k3":
        return torch.expm1(d) - d
    raise ValueError(f"kl: {kl!r} is not a sampled estimator (expected one of {SAMPLED_KL_ESTIMATORS})")


def sampled_kl_grad(d: torch.Tensor, kl: str) -> torch.Tensor:
    """∂k/∂logp of the sampled estimator `kl` at d = ref_logp − logp, the reference's log-prob held constant:
    k1: 1, k2: −d, k3: −(e^d − 1)."""
    if kl == "k1":
        return torch.ones_like(d)
    if kl == "k2":
        return -d
    if kl == "k3":
        return -torch.expm1(d)
    raise ValueError(f"kl: {kl!r} is not a sampled estimator (expected one of {SAMPLED_KL_ESTIMATORS})")
