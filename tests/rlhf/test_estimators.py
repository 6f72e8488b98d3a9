"""The critic-free estimators and losses (rlhf.estimators): hand-computed examples, and TRL's formulas written out
below as an independent oracle (trl is not installed).

The oracle transcribes TRL main at commit 00313f2 (2026): trl/trainer/grpo_trainer.py,
GRPOTrainer._generate_and_score_completions (advantages, scale_rewards "group" / "batch" / "none", ε = 1e-4)
and GRPOTrainer._compute_loss (loss_type "grpo", "dr_grpo", "dapo", the k3 KL term, the clip-ratio metrics);
trl/trainer/rloo_trainer.py, RLOOTrainer._generate_and_score_completions (β·KL summed into the reward, the
leave-one-out baseline, normalize_advantages) and RLOOTrainer._compute_loss (sequence-level ratio).
"""
import math

import pytest
import torch

from hydra_kernels.rlhf import estimators as E


# ----------------------------------------------------------------------------------------------- TRL oracle
def trl_grpo_advantages(rewards, num_generations, scale_rewards):
    mean_grouped_rewards = rewards.view(-1, num_generations).mean(dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = rewards.view(-1, num_generations).std(dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = rewards.std().expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return advantages, is_std_zero


def trl_grpo_loss(per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, *, beta,
                  epsilon_low, epsilon_high, loss_type, max_completion_length, num_items_in_batch):
    advantages = advantages.unsqueeze(1)
    coef_1 = torch.exp(per_token_logps - old_per_token_logps)
    if beta != 0.0:
        per_token_kl = torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "dapo":
        loss = (per_token_loss * mask).sum() / num_items_in_batch
    completion_token_count = mask.sum().clamp(min=1.0)
    is_low_clipped = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    is_high_clipped = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    metrics = {"clip_ratio/low_mean": (is_low_clipped.float() * mask).sum() / completion_token_count,
               "clip_ratio/high_mean": (is_high_clipped.float() * mask).sum() / completion_token_count,
               "clip_ratio/region_mean": ((is_low_clipped | is_high_clipped).float() * mask).sum()
               / completion_token_count}
    if beta != 0.0:
        metrics["kl"] = (per_token_kl * mask).sum() / completion_token_count
    return loss, metrics


def trl_rloo_advantages(rewards, old_per_token_logps, ref_per_token_logps, completion_mask, *, beta,
                        num_generations, normalize_advantages):
    if beta != 0.0:
        per_token_kl = old_per_token_logps - ref_per_token_logps
        kl = (per_token_kl * completion_mask).sum(-1)
        rewards = rewards - beta * kl
    grouped_rewards = rewards.view(-1, num_generations)
    grouped_sum = grouped_rewards.sum(dim=1, keepdim=True)
    baselines = (grouped_sum - grouped_rewards) / (num_generations - 1)
    advantages = rewards - baselines.view(-1)
    if normalize_advantages:
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
    return advantages


def trl_rloo_loss(per_token_logps, old_per_token_logps, advantages, completion_mask, *, epsilon_low, epsilon_high):
    logps = (per_token_logps * completion_mask).sum(1)
    old_logps = (old_per_token_logps * completion_mask).sum(1)
    coef_1 = torch.exp(logps - old_logps)
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    per_sequence_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    return per_sequence_loss.mean()


# ------------------------------------------------------------------------------------------------- data
def _batch(B=8, R=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, R, generator=g, dtype=dtype) * 3
    old = logp + 0.3 * torch.randn(B, R, generator=g, dtype=dtype)        # ratios on both sides of the clip
    ref = logp + 0.2 * torch.randn(B, R, generator=g, dtype=dtype)
    lengths = torch.randint(1, R + 1, (B,), generator=g)
    mask = (torch.arange(R)[None] < lengths[:, None]).to(dtype)
    rewards = torch.randn(B, generator=g, dtype=dtype)
    return logp, old, ref, mask, rewards


# ------------------------------------------------------------------------------------------ hand examples
def test_grpo_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
    std1 = math.sqrt(4 * 0.25 / 3)                                    # unbiased std of [1, 0, 0, 1]
    std2 = math.sqrt((3 * 0.75 ** 2 + 2.25 ** 2) / 3)                 # of [2, 2, 2, 5], mean 2.75
    want = [0.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), -0.5 / (std1 + 1e-4), 0.5 / (std1 + 1e-4),
            -0.75 / (std2 + 1e-4), -0.75 / (std2 + 1e-4), -0.75 / (std2 + 1e-4), 2.25 / (std2 + 1e-4)]
    assert E.grpo_advantages(r, 4, "group").tolist() == pytest.approx(want, rel=1e-6)
    assert E.grpo_advantages(r, 4, "none").tolist() == pytest.approx([.5, -.5, -.5, .5, -.75, -.75, -.75, 2.25])
    batch = float(r.std())
    assert E.grpo_advantages(r, 4, "batch").tolist() == pytest.approx(
        [x / (batch + 1e-4) for x in (.5, -.5, -.5, .5, -.75, -.75, -.75, 2.25)], rel=1e-6)
    with pytest.raises(ValueError, match="group_size"):
        E.grpo_advantages(r, 3)
    with pytest.raises(ValueError, match="scale"):
        E.grpo_advantages(r, 4, "whiten")


def test_rloo_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 1.0])
    # group [1, 0, 0, 1]: baseline of row 0 = (0 + 0 + 1) / 3; group [3, 1]: baseline of row 4 = 1.
    assert E.rloo_advantages(r[:4], 4).tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert E.rloo_advantages(r[4:], 2).tolist() == pytest.approx([2.0, -2.0])
    with pytest.raises(ValueError, match="group_size"):
        E.rloo_advantages(r, 1)
    with pytest.raises(ValueError, match="scale"):
        E.rloo_advantages(r, 2, "group")


def test_reinforce_pp_advantages_by_hand():
    scores = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    beta, gamma = 0.5, 0.9
    # r = −β·kl, + score at the last real token; returns-to-go with γ; whitened over the 4 real tokens.
    r0 = [-0.05, -0.1, -0.15 + 1.0]
    g0 = [r0[0] + gamma * (r0[1] + gamma * r0[2]), r0[1] + gamma * r0[2], r0[2]]
    g1 = [-0.25 - 1.0]
    vals = g0 + g1
    mean = sum(vals) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / 3 + 1e-8)
    want = [[(v - mean) / std for v in g0], [(g1[0] - mean) / std, 0.0, 0.0]]
    got = E.reinforce_pp_advantages(scores, kl, mask, beta, gamma)
    assert got.tolist()[0] == pytest.approx(want[0], rel=1e-5) and got.tolist()[1] == pytest.approx(want[1], abs=1e-6)
    # The baseline variant subtracts the group's mean score first: scores [1, −1] in one group become [1, −1]
    # (mean 0); in groups of one they become 0 and only the KL is left.
    same = E.reinforce_pp_advantages(scores, kl, mask, beta, gamma, group_size=2)
    assert torch.allclose(same, got)
    alone = E.reinforce_pp_advantages(scores, kl, mask, beta, gamma, group_size=1)
    assert torch.allclose(alone, E.reinforce_pp_advantages(torch.zeros(2), kl, mask, beta, gamma))


def test_overlong_penalty_by_hand():
    lengths = torch.tensor([5, 6, 7, 9, 10])
    # L_max 10, L_cache 4: 0 up to 6 tokens, then (6 − |y|) / 4.
    assert E.overlong_penalty(lengths, 10, 4).tolist() == pytest.approx([0, 0, -0.25, -0.75, -1.0])
    assert E.overlong_penalty(lengths, 10, 4, factor=2.0).tolist() == pytest.approx([0, 0, -0.5, -1.5, -2.0])
    assert E.overlong_penalty(lengths, 10, 0).tolist() == [0.0] * 5
    assert E.overlong_penalty(torch.tensor([11]), 10, 4).tolist() == [-1.0]
    with pytest.raises(ValueError, match="buffer"):
        E.overlong_penalty(lengths, 10, 11)


def test_clipped_loss_by_hand():
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))
    old = torch.zeros(1, 3)
    # ratios 1.5, 0.5, 1.1 with ε_low 0.2, ε_high 0.28; A = +1: −min(ρ, clip(ρ)) = −1.28, −0.5, −1.1.
    loss, st = E.clipped_token_loss(logp, old, torch.tensor([1.0]), 0.2, 0.28)
    assert loss.tolist()[0] == pytest.approx([-1.28, -0.5, -1.1])
    assert st["high_clipped"].tolist() == [[True, False, False]] and not st["low_clipped"].any()
    # A = −1: −min(−ρ, −clip(ρ)) = max(ρ, clip(ρ)) = 1.5, 0.8, 1.1.
    loss, st = E.clipped_token_loss(logp, old, torch.tensor([-1.0]), 0.2, 0.28)
    assert loss.tolist()[0] == pytest.approx([1.5, 0.8, 1.1])
    assert st["low_clipped"].tolist() == [[False, True, False]] and not st["high_clipped"].any()


def test_aggregations_by_hand():
    per = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    assert E.aggregate_loss(per, mask, "seq-mean-token-mean").item() == pytest.approx((2.0 + 4.0 + 0.0) / 3)
    assert E.aggregate_loss(per, mask, "seq-mean-token-sum-norm", 5).item() == pytest.approx(10.0 / 15)
    assert E.aggregate_loss(per, mask, "token-mean").item() == pytest.approx(10.0 / 4)
    assert E.aggregate_loss(per, mask, "token-mean", n_tokens=torch.tensor(8.0)).item() == pytest.approx(10.0 / 8)
    with pytest.raises(ValueError, match="constant"):
        E.aggregate_loss(per, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="mode"):
        E.aggregate_loss(per, mask, "sequence")


def test_group_statistics():
    r = torch.tensor([1.0, 1.0, 0.0, 2.0])
    mean, std = E.group_stats(r, 2)
    assert mean.tolist() == [1.0, 1.0, 1.0, 1.0] and std.tolist() == pytest.approx([0, 0, 2 ** 0.5, 2 ** 0.5])
    assert E.zero_std_groups(r, 2).tolist() == [True, True, False, False]
    assert E.token_count(torch.zeros(2, 3)).item() == 1 and E.token_count(torch.ones(2, 3)).item() == 6


# ----------------------------------------------------------------------------------------- against TRL
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_grpo_advantages_match_trl(scale):
    _, _, _, _, r = _batch(B=12, seed=1)
    r[4:8] = 0.5                                                            # one group of equal rewards
    want, zero = trl_grpo_advantages(r, 4, scale)
    assert torch.allclose(E.grpo_advantages(r, 4, scale).double(), want, rtol=1e-6, atol=1e-6)
    if scale != "batch":           # TRL's frac_reward_zero_std then tests the batch's std, not the groups'
        assert torch.equal(E.zero_std_groups(r, 4), zero) and zero[4:8].all() and not zero[:4].any()


@pytest.mark.parametrize("loss_type, mode", [("grpo", "seq-mean-token-mean"), ("dr_grpo", "seq-mean-token-sum-norm"),
                                             ("dapo", "token-mean")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_token_losses_match_trl(loss_type, mode, beta):
    """Loss value, gradient with respect to the log-probs, and TRL's clip-ratio and KL metrics."""
    logp, old, ref, mask, r = _batch(seed=2)
    adv, _ = trl_grpo_advantages(r, 4, "group")
    lo, hi, L = 0.2, 0.28, 6
    lp_trl = logp.clone().requires_grad_(True)
    want, metrics = trl_grpo_loss(lp_trl, old, ref, adv, mask, beta=beta, epsilon_low=lo, epsilon_high=hi,
                                  loss_type=loss_type, max_completion_length=L, num_items_in_batch=mask.sum())
    want.backward()

    lp = logp.clone().requires_grad_(True)
    per, st = E.clipped_token_loss(lp, old, adv, lo, hi)
    if beta:
        from hydra_kernels.kernels.kl import sampled_kl
        per = per + beta * sampled_kl(ref - lp, "k3")
    got = E.aggregate_loss(per, mask, mode, L)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-15)
    assert torch.allclose(lp.grad, lp_trl.grad, rtol=1e-12, atol=1e-15)
    for key, name in (("low_clipped", "low_mean"), ("high_clipped", "high_mean")):
        ours = (st[key].double() * mask).sum() / mask.sum()
        assert ours.item() == pytest.approx(metrics[f"clip_ratio/{name}"].item())
    assert metrics["clip_ratio/region_mean"] > 0                        # the batch exercises the clip


@pytest.mark.parametrize("normalize", [False, True])
def test_rloo_matches_trl(normalize):
    logp, old, ref, mask, r = _batch(seed=3)
    beta = 0.05
    want_adv = trl_rloo_advantages(r, old, ref, mask, beta=beta, num_generations=4, normalize_advantages=normalize)
    kl = (old - ref) * mask                              # the scoring pass's k1 per token (old − ref)
    adv = E.rloo_advantages(r - beta * kl.sum(1), 4, "batch" if normalize else "none")
    assert torch.allclose(adv.double(), want_adv, rtol=1e-6, atol=1e-6)

    lp_trl = logp.clone().requires_grad_(True)
    want = trl_rloo_loss(lp_trl, old, want_adv, mask, epsilon_low=0.2, epsilon_high=0.2)
    want.backward()
    lp = logp.clone().requires_grad_(True)
    got, st = E.sequence_clipped_loss(lp, old, want_adv, mask, 0.2, 0.2)
    got.backward()
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    assert torch.allclose(lp.grad, lp_trl.grad, rtol=1e-12, atol=1e-15)
    assert st["ratio"].shape == (8,)


def test_sequence_loss_ignores_rows_without_tokens():
    """A masked row (a truncated completion with mask_truncated) adds nothing, as in TRL where its masked
    log-probs are constants: the same gradient, the constant left out of the value."""
    logp, old, _, mask, r = _batch(seed=4)
    mask[2] = 0
    adv = E.rloo_advantages(r, 4)
    lp = logp.clone().requires_grad_(True)
    got, _ = E.sequence_clipped_loss(lp, old, adv, mask, 0.2, 0.2)
    got.backward()
    lp_trl = logp.clone().requires_grad_(True)
    trl_rloo_loss(lp_trl, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2).backward()
    assert torch.allclose(lp.grad, lp_trl.grad) and lp.grad[2].abs().sum() == 0


def test_presets_follow_the_sources():
    assert E.PRESETS["grpo"]["beta"] == 0.0 and E.PRESETS["grpo"]["loss_agg"] == "seq-mean-token-mean"
    dapo = E.preset_settings("dapo", 20480)
    assert (dapo["cliprange_low"], dapo["cliprange_high"], dapo["beta"], dapo["loss_agg"]) == (0.2, 0.28, 0.0,
                                                                                                "token-mean")
    assert dapo["filter_groups"] and dapo["mask_truncated"] and dapo["overlong_buffer"] == 4096
    assert E.PRESETS["dr_grpo"]["scale_rewards"] == "none"
    assert E.PRESETS["rloo"]["kl_in"] == "reward" and E.PRESETS["rloo"]["loss_agg"] == "sequence"
    assert set(E.PRESETS) == set(E.ESTIMATORS)
    assert all(E.PRESETS[e]["scale_rewards"] == E.SCALINGS[e][0] for e in E.ESTIMATORS)
    with pytest.raises(ValueError, match="estimator"):
        E.preset_settings("ppo", 10)
