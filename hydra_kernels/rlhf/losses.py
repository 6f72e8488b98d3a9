"""PPO losses: clipped policy loss, clipped value loss, entropy bonus. Token-level masked means.

Every input is [B, R] over response positions with `mask` 1 on real response tokens; prompt and padding
tokens never enter a loss or a statistic (they are multiplied out, and the mean divides by mask.sum()).
"""
from __future__ import annotations

import torch

from hydra_kernels.rlhf.advantages import masked_mean


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict]:
    """L = mean_t max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(logp − old_logp).

    Stats (detached floats): approxkl = ½·mean (logp − old)² (TRL's), clipfrac = share of tokens where the
    clipped term is the one used, ratio = mean ρ.
    """
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(pg1, pg2), mask)
    with torch.no_grad():
        stats = {"approxkl": 0.5 * masked_mean(log_ratio ** 2, mask),
                 "clipfrac": masked_mean((pg2 > pg1).to(pg1.dtype), mask),
                 "ratio": masked_mean(ratio, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict]:
    """L = ½·mean_t max((V − G)², (V_clip − G)²), V_clip = old + clip(V − old, ±ε). Stats: clipfrac."""
    v_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((l2 > l1).to(l1.dtype), mask)}
    return loss, stats


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy over response tokens (subtract coef · this from the loss to encourage it)."""
    return masked_mean(entropy, mask)


def ppo_loss(logprobs, old_logprobs, advantages, values, old_values, returns, mask, entropy=None, *,
             cliprange: float, cliprange_value: float, vf_coef: float, entropy_coef: float = 0.0):
    """policy loss + vf_coef·value loss − entropy_coef·entropy; returns (loss, stats of detached tensors).

    logprobs None leaves out the policy's terms (and the entropy), values None the value loss: PPO's step then
    sums the two parts' backwards (models.separate_roles).

    The stats are one minibatch's, under the names TRL's PPOTrainer logs their minibatch means with
    (loss/policy_avg, loss/value_avg, policy/approxkl_avg, policy/clipfrac_avg, val/clipfrac_avg, val/ratio,
    policy/entropy_avg when `entropy` is given), plus loss/total (TRL has none): the PPO step averages them
    over its minibatches."""
    if logprobs is None and values is None:
        raise ValueError("logprobs: both logprobs and values are None; nothing to train")
    terms, stats = [], {}
    if logprobs is not None:
        pg, pg_stats = policy_loss(logprobs, old_logprobs, advantages, mask, cliprange)
        terms.append(pg)
        stats.update({"policy/approxkl_avg": pg_stats["approxkl"], "policy/clipfrac_avg": pg_stats["clipfrac"],
                      "val/ratio": pg_stats["ratio"], "loss/policy_avg": pg.detach()})
    if values is not None:
        vf, vf_stats = value_loss(values, old_values, returns, mask, cliprange_value)
        terms.append(vf_coef * vf)
        stats.update({"loss/value_avg": vf.detach(), "val/clipfrac_avg": vf_stats["clipfrac"]})
    loss = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    if logprobs is not None and entropy is not None:
        ent = entropy_bonus(entropy, mask)
        if entropy_coef:
            loss = loss - entropy_coef * ent
        stats["policy/entropy_avg"] = ent.detach()
    stats["loss/total"] = loss.detach()
    return loss, stats


__all__ = ["policy_loss", "value_loss", "entropy_bonus", "ppo_loss"]
