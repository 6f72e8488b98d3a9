"""Per-token rewards, the KL coefficient controllers, GAE and masked whitening.

Shapes: [B, R] over response positions (R = longest response in the batch); `mask` [B, R] is 1 for real
response tokens (up to and including EOS) and 0 after. Position t's value is the critic's estimate before
response token t is emitted; the score is paid at the last real token.
"""
from __future__ import annotations

import math

import torch

from hydra_kernels.integrations.hydra_model import last_token_index


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of x over the entries where the 0/1 mask is 1 (over all of them, or along `dim`); 0 where none are."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance over the masked entries; unbiased (n − 1) as TRL, so whitening matches it."""
    mean = masked_mean(x, mask)
    m = mask.to(x.dtype)
    n = m.sum()
    var = (((x - mean) ** 2) * m).sum() / n.clamp_min(1)
    if unbiased:
        if n < 2:
            return torch.zeros_like(var)
        var = var * n / (n - 1)
    return var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / sqrt(var + eps) over masked entries (mean added back when not shift_mean); 0 off the mask."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def shape_scores(scores: torch.Tensor, ended: torch.Tensor, reward_clip: float | None = None,
                 missing_eos_penalty: float | None = None) -> torch.Tensor:
    """Sequence scores as PPO uses them: clipped to [-reward_clip, reward_clip], then lowered by
    missing_eos_penalty where the response never emitted EOS (clipping first keeps the penalty effective for
    scores beyond the bound)."""
    r = scores.float()
    if reward_clip is not None:
        r = r.clamp(-reward_clip, reward_clip)
    if missing_eos_penalty is not None:
        r = r - missing_eos_penalty * (~ended.bool()).float()
    return r


def per_token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """r_t = −β·KL_t on every response token, plus the score at the last one."""
    if scores.shape != kl.shape[:1] or kl.shape != mask.shape:
        raise ValueError(f"scores: shape {tuple(scores.shape)} must be [B] for kl/mask of shape {tuple(kl.shape)}")
    m = mask.to(kl.dtype)
    rewards = -kl_coef * kl * m
    idx = last_token_index(mask, "mask")
    rewards[torch.arange(rewards.shape[0], device=rewards.device), idx] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over right-padded responses.

    δ_t = r_t + γ·V_{t+1} − V_t (V after the last real token is 0: the episode ends there),
    A_t = δ_t + γλ·A_{t+1}. Returns (advantages, returns = A + V), both 0 off the mask.
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"values: rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    R = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(R)):
        next_v = values[:, t + 1] if t + 1 < R else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        # Off the mask δ = 0 and A = 0, so the recursion restarts cleanly at each row's last real token.
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + values) * m


class FixedKLController:
    """β stays where it starts."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019): β ← β·(1 + clip(KL/target − 1, −0.2, 0.2)·n_steps/horizon).

    `current_kl` is the mean KL per sequence (summed over its tokens); n_steps the samples in the batch.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        if not target > 0:
            raise ValueError(f"target: must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon: must be > 0, got {horizon}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        if not math.isfinite(current_kl):
            return
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def kl_controller(cfg) -> FixedKLController | AdaptiveKLController:
    """The controller a PPOConfig asks for."""
    if cfg.adaptive_kl:
        return AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return FixedKLController(cfg.kl_coef)


__all__ = ["masked_mean", "masked_var", "whiten", "shape_scores", "per_token_rewards", "gae",
           "FixedKLController", "AdaptiveKLController", "kl_controller"]
