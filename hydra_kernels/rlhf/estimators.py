"""Critic-free advantage estimators and their loss aggregations: small pure functions, one per definition.

    estimator        advantage                                          KL (preset)      loss (preset)
    grpo             (r − group mean) / (group std + ε)                 k3 in the loss   seq-mean-token-mean
    dr_grpo          r − group mean                                     k3 in the loss   seq-mean-token-sum-norm
    dapo             (r − group mean) / (group std + ε)                 none             token-mean
    rloo             r − mean of the other G − 1 rewards                k1 in the reward sequence
    reinforce_pp     returns-to-go of −β·KL_t (+ score at the end),     k1 in the reward token-mean
                     whitened over every response token of the batch
    reinforce_pp_baseline  the same, with the group mean subtracted from the score first

The step's batch statistics each have one home here (group_stats, batch_std, token_count, and
advantages.whiten for the token whitening), so a distributed all-reduce slots in at one place each.
Rows are grouped as the GRPO step lays them out: rows g·G … g·G + G − 1 are the G completions of prompt g.
"""
from __future__ import annotations

import math

import torch

from hydra_kernels.rlhf.advantages import gae, per_token_rewards, whiten

ESTIMATORS = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
# verl's loss_agg_mode names, plus "sequence": one sequence-level ratio per completion (TRL's RLOOTrainer).
LOSS_AGGREGATIONS = ("seq-mean-token-mean", "seq-mean-token-sum-norm", "token-mean", "sequence")
SCALE_REWARDS = ("group", "batch", "none")
KL_PLACEMENTS = ("loss", "reward")
# Estimators whose advantage is one number per completion (the others give one per token).
SEQUENCE_LEVEL = ("grpo", "dr_grpo", "dapo", "rloo")
# Estimators that need a group of G >= 2 completions per prompt.
GROUPED = ("grpo", "dr_grpo", "dapo", "rloo", "reinforce_pp_baseline")
# scale_rewards each estimator accepts (the first is its preset).
SCALINGS = {"grpo": SCALE_REWARDS, "dr_grpo": ("none", "group", "batch"), "dapo": SCALE_REWARDS,
            "rloo": ("none", "batch"), "reinforce_pp": ("none",), "reinforce_pp_baseline": ("none",)}
STD_EPS = 1e-4          # TRL's ε in (r − mean) / (std + ε), GRPO and RLOO alike

# Each estimator's settings as its sources define them; GRPOConfig fields left null take these
# (overlong_buffer here is a fraction of max_new_tokens: preset_settings turns it into tokens).
PRESETS: dict[str, dict] = {
    "grpo": dict(scale_rewards="group", loss_agg="seq-mean-token-mean", cliprange_low=0.2, cliprange_high=0.2,
                 beta=0.0, kl_in="loss", kl_estimator="k3", filter_groups=False, overlong_buffer=0,
                 mask_truncated=False),
    "dr_grpo": dict(scale_rewards="none", loss_agg="seq-mean-token-sum-norm", cliprange_low=0.2,
                    cliprange_high=0.2, beta=0.0, kl_in="loss", kl_estimator="k3", filter_groups=False,
                    overlong_buffer=0, mask_truncated=False),
    # DAPO (Yu et al. 2025): clip-higher, token-level loss, dynamic sampling, overlong shaping and filtering;
    # its soft overlong buffer is 4096 of 20480 tokens: a fifth of the completion budget (preset_settings).
    "dapo": dict(scale_rewards="group", loss_agg="token-mean", cliprange_low=0.2, cliprange_high=0.28,
                 beta=0.0, kl_in="loss", kl_estimator="k3", filter_groups=True, overlong_buffer=0.2,
                 mask_truncated=True),
    "rloo": dict(scale_rewards="none", loss_agg="sequence", cliprange_low=0.2, cliprange_high=0.2, beta=0.05,
                 kl_in="reward", kl_estimator="k1", filter_groups=False, overlong_buffer=0, mask_truncated=False),
    "reinforce_pp": dict(scale_rewards="none", loss_agg="token-mean", cliprange_low=0.2, cliprange_high=0.2,
                         beta=0.01, kl_in="reward", kl_estimator="k1", filter_groups=False, overlong_buffer=0,
                         mask_truncated=False),
}
PRESETS["reinforce_pp_baseline"] = dict(PRESETS["reinforce_pp"])


def preset_settings(estimator: str, max_new_tokens: int) -> dict:
    """The preset of `estimator` (PRESETS), with overlong_buffer in tokens for a completion budget of
    max_new_tokens. Raises ValueError for an unknown estimator."""
    if estimator not in PRESETS:
        raise ValueError(f"estimator: must be one of {ESTIMATORS}, got {estimator!r}")
    out = dict(PRESETS[estimator])
    out["overlong_buffer"] = int(round(out["overlong_buffer"] * max_new_tokens))
    return out


# ------------------------------------------------------------------------------ batch statistics (one home each)
def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    if x.dim() != 1 or group_size < 1 or x.shape[0] % group_size:
        raise ValueError(f"rewards: need shape [B] with B divisible by group_size {group_size}, got "
                         f"{tuple(x.shape)}")
    return x.view(-1, group_size)


def group_stats(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row mean and unbiased std of its group's rewards ([B] each; std NaN for groups of one), as TRL's
    rewards.view(-1, G).mean(1) / .std(1), repeated to the rows. Distributed: groups are kept whole per rank."""
    g = _groups(rewards, group_size)
    std = g.std(1) if group_size > 1 else torch.full_like(g[:, 0], math.nan)
    return g.mean(1).repeat_interleave(group_size), std.repeat_interleave(group_size)


def batch_std(x: torch.Tensor) -> torch.Tensor:
    """Unbiased std of every entry of x (TRL's scale_rewards="batch": rewards.std()). Distributed: a global
    statistic (all-reduce of the sum and the sum of squares)."""
    return x.std()


def token_count(mask: torch.Tensor) -> torch.Tensor:
    """Number of response tokens that carry a loss (the normaliser of "token-mean"), at least 1. Distributed:
    the global count (all-reduce), as DAPO's 1 / Σ|o_i| over the whole batch."""
    return mask.sum().clamp_min(1)


def zero_std_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B] bool: the row's group has (numerically) equal rewards, TRL's isclose(std, 0) (frac_reward_zero_std;
    DAPO's dynamic sampling drops these groups)."""
    _, std = group_stats(rewards, group_size)
    return torch.isclose(std, torch.zeros_like(std))


# ------------------------------------------------------------------------------------------ advantages
def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """A_i = (r_i − mean of i's group) / (std + ε), ε = 1e-4; std of the group ("group", GRPO: Shao et al. 2024,
    DeepSeekMath, eq. 3), of the whole batch ("batch", Liu et al. 2025 "Understanding R1-Zero-Like Training"
    discuss both), or no division ("none": Dr. GRPO, the same paper). As TRL's GRPOTrainer
    (_generate_and_score_completions, scale_rewards group / batch / none) and verl's compute_grpo_outcome_advantage.

    rewards: [B] sequence rewards. Returns [B] float32."""
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale: must be one of {SCALE_REWARDS}, got {scale!r}")
    r = rewards.float()
    mean, std = group_stats(r, group_size)
    adv = r - mean
    if scale == "group":
        adv = adv / (std + STD_EPS)
    elif scale == "batch":
        adv = adv / (batch_std(r) + STD_EPS)
    return adv


def rloo_advantages(rewards: torch.Tensor, group_size: int, scale: str = "none") -> torch.Tensor:
    """A_i = r_i − (Σ_j r_j − r_i) / (G − 1) over i's group: the leave-one-out baseline (Kool et al. 2019, "Buy 4
    REINFORCE samples, get a baseline for free"; Ahmadian et al. 2024, "Back to Basics", eq. 7). As TRL's
    RLOOTrainer (rewards already less β·KL) and OpenRLHF's "rloo". scale "batch" whitens over the batch,
    (A − mean) / (std + ε) (TRL's normalize_advantages); "none" leaves it.

    rewards: [B] sequence rewards, G >= 2. Returns [B] float32."""
    if group_size < 2:
        raise ValueError(f"group_size: the leave-one-out baseline needs >= 2 completions per prompt, got "
                         f"{group_size}")
    if scale not in ("none", "batch"):
        raise ValueError(f"scale: rloo takes 'none' or 'batch', got {scale!r}")
    g = _groups(rewards.float(), group_size)
    adv = (g - (g.sum(1, keepdim=True) - g) / (group_size - 1)).reshape(-1)
    if scale == "batch":
        adv = (adv - adv.mean()) / (batch_std(adv) + STD_EPS)
    return adv


def reinforce_pp_advantages(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                            gamma: float = 1.0, group_size: int | None = None,
                            loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE++ (Hu et al. 2025, "REINFORCE++: an efficient RLHF algorithm with robustness to both prompt and
    reward models"; OpenRLHF's advantage_estimator "reinforce" / "reinforce_baseline"): per-token rewards
    r_t = −β·KL_t on every response token plus the score at the last one (advantages.per_token_rewards), the
    discounted returns-to-go G_t = Σ_{s>=t} γ^{s−t} r_s (advantages.gae with zero values and λ = 1), whitened
    over every response token of the batch (advantages.whiten). With group_size (the "_baseline" variant) the
    group's mean score is subtracted from each score first.

    scores: [B]; kl, mask: [B, R] (kl 0 off the mask); loss_mask: the tokens that carry a loss, over which the
    whitening's statistics run (default mask). Returns [B, R] float32, 0 off loss_mask."""
    s = scores.float()
    if group_size is not None:
        s = s - group_stats(s, group_size)[0]
    rewards = per_token_rewards(s, kl.float(), mask, beta)
    returns, _ = gae(rewards, torch.zeros_like(rewards), mask, gamma, 1.0)
    return whiten(returns, mask if loss_mask is None else loss_mask)


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13; TRL's rewards.get_soft_overlong_punishment, verl's
    overlong_buffer): 0 for |y| <= L_max − L_cache, ((L_max − L_cache) − |y|) / L_cache up to L_max, −1 beyond;
    times `factor`. lengths: [B] completion lengths (EOS counted). Returns [B] float32 (all 0 when buffer is 0)."""
    if buffer < 0 or buffer > max_len:
        raise ValueError(f"buffer: must be in [0, {max_len}], got {buffer}")
    n = lengths.float()
    if buffer == 0:
        return torch.zeros_like(n)
    soft = ((max_len - buffer) - n) / buffer
    out = torch.where(n <= max_len - buffer, torch.zeros_like(n), soft)
    return factor * torch.where(n > max_len, torch.full_like(n, -1.0), out)


# ------------------------------------------------------------------------------------------------ losses
def clipped_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       cliprange_low: float, cliprange_high: float) -> tuple[torch.Tensor, dict]:
    """Per-token −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A), ρ = exp(logp − old): PPO's clipped surrogate
    (Schulman et al. 2017) with DAPO's decoupled clip-higher bounds, as TRL's GRPOTrainer._compute_loss.

    logprobs, old_logprobs: [B, R]; advantages: [B] (broadcast over tokens) or [B, R]. Returns (per-token loss
    [B, R], {"ratio", "low_clipped", "high_clipped"}: ρ and TRL's clip indicators, detached)."""
    adv = advantages[:, None] if advantages.dim() == 1 else advantages
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = ratio.clamp(1.0 - cliprange_low, 1.0 + cliprange_high)
    loss = -torch.minimum(ratio * adv, clipped * adv)
    with torch.no_grad():
        low = (ratio < 1.0 - cliprange_low) & (adv < 0)
        high = (ratio > 1.0 + cliprange_high) & (adv > 0)
    return loss, {"ratio": ratio.detach(), "low_clipped": low, "high_clipped": high}


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, constant: float | None = None,
                   n_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """One loss from per-token losses [B, R] (mask 1 on the tokens that count):
        seq-mean-token-mean      mean over rows of each row's token mean (TRL loss_type "grpo"; a row without
                                 tokens counts 0)
        seq-mean-token-sum-norm  Σ tokens / (B · constant) (Dr. GRPO, Liu et al. 2025; TRL "dr_grpo" with
                                 constant = max_completion_length)
        token-mean               Σ tokens / n_tokens (DAPO, Yu et al. 2025, eq. 8; TRL "dapo"; n_tokens default
                                 token_count(mask): pass the count of the whole optimizer batch)
    Returns a 0-d tensor."""
    m = mask.to(per_token.dtype)
    if mode == "seq-mean-token-mean":
        return ((per_token * m).sum(1) / m.sum(1).clamp_min(1)).mean()
    if mode == "seq-mean-token-sum-norm":
        if not constant or constant <= 0:
            raise ValueError(f"constant: seq-mean-token-sum-norm needs a constant > 0, got {constant!r}")
        return (per_token * m).sum() / (per_token.shape[0] * constant)
    if mode == "token-mean":
        return (per_token * m).sum() / (token_count(mask) if n_tokens is None else n_tokens)
    raise ValueError(f"mode: must be one of {LOSS_AGGREGATIONS[:3]} for a per-token loss, got {mode!r}")


def sequence_clipped_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                          mask: torch.Tensor, cliprange_low: float,
                          cliprange_high: float) -> tuple[torch.Tensor, dict]:
    """The sequence-level clipped loss of TRL's RLOOTrainer (REINFORCE with the completion as one action,
    Ahmadian et al. 2024): ρ_i = exp(Σ_t (logp − old)) over i's tokens, loss = mean_i −min(ρ_i·A_i,
    clip(ρ_i, 1 − ε_low, 1 + ε_high)·A_i); a row without tokens counts 0.

    logprobs, old_logprobs, mask: [B, R]; advantages: [B]. Returns (loss, stats as clipped_token_loss's, per row)."""
    m = mask.to(logprobs.dtype)
    log_ratio = ((logprobs - old_logprobs) * m).sum(1)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - cliprange_low, 1.0 + cliprange_high)
    has = (m.sum(1) > 0).to(logprobs.dtype)
    loss = (-torch.minimum(ratio * advantages, clipped * advantages) * has).mean()
    with torch.no_grad():
        low = (ratio < 1.0 - cliprange_low) & (advantages < 0)
        high = (ratio > 1.0 + cliprange_high) & (advantages > 0)
    return loss, {"ratio": ratio.detach(), "low_clipped": low, "high_clipped": high}


__all__ = ["ESTIMATORS", "LOSS_AGGREGATIONS", "SCALE_REWARDS", "KL_PLACEMENTS", "SEQUENCE_LEVEL", "GROUPED",
           "SCALINGS", "PRESETS", "preset_settings", "STD_EPS", "group_stats", "batch_std", "token_count",
           "zero_std_groups",
           "grpo_advantages", "rloo_advantages", "reinforce_pp_advantages", "overlong_penalty",
           "clipped_token_loss", "aggregate_loss", "sequence_clipped_loss"]
