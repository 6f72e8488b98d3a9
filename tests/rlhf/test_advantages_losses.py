"""GAE, whitening, per-token rewards, KL controllers and PPO losses against hand-computed values."""
import math

import pytest
import torch

from hydra_kernels.rlhf.advantages import (AdaptiveKLController, FixedKLController, gae, masked_mean, masked_var,
                                           per_token_rewards, shape_scores, whiten)
from hydra_kernels.rlhf.losses import entropy_bonus, policy_loss, ppo_loss, value_loss


def test_gae_matches_hand_computation():
    # One row of 3 real tokens, then padding (whose garbage must not leak in).
    r = torch.tensor([[0.5, -1.0, 2.0, 99.0]])
    v = torch.tensor([[1.0, 2.0, 3.0, 77.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    g, lam = 0.9, 0.8
    d2 = 2.0 + g * 0 - 3.0                      # the episode ends at the last real token
    d1 = -1.0 + g * 3.0 - 2.0
    d0 = 0.5 + g * 2.0 - 1.0
    a2 = d2
    a1 = d1 + g * lam * a2
    a0 = d0 + g * lam * a1
    adv, ret = gae(r, v, m, g, lam)
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[a0 + 1.0, a1 + 2.0, a2 + 3.0, 0.0]]))


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    r = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    v = torch.tensor([[0.5, 0.25, 0.125], [1.0, 5.0, 5.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    adv, ret = gae(r, v, m, 1.0, 1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0], [4.0, 0.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[5.5, 4.75, 2.875], [3.0, 0.0, 0.0]]))


def test_whiten_matches_hand_computation():
    x = torch.tensor([[1.0, 2.0, 3.0, 1000.0]])
    m = torch.tensor([[1, 1, 1, 0]])
    mean, var = 2.0, 1.0                         # unbiased variance of (1, 2, 3)
    expect = torch.tensor([[(1 - mean) / math.sqrt(var + 1e-8), 0.0, (3 - mean) / math.sqrt(var + 1e-8), 0.0]])
    torch.testing.assert_close(whiten(x, m), expect)
    torch.testing.assert_close(whiten(x, m, shift_mean=False), (expect + mean) * m)
    assert masked_mean(x, m).item() == 2.0
    assert masked_var(x, m).item() == 1.0


def test_per_token_rewards_puts_the_score_on_the_last_real_token():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = per_token_rewards(torch.tensor([1.0, -2.0]), kl, m, kl_coef=0.5)
    torch.testing.assert_close(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.2 - 2.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="mask"):
        per_token_rewards(torch.ones(2), kl, torch.tensor([[1, 1, 1], [0, 0, 0]]), 0.1)


def test_shape_scores_clips_then_penalises_missing_eos():
    scores, ended = torch.tensor([10.0, 9.0, -10.0, 0.5]), torch.tensor([True, False, False, True])
    torch.testing.assert_close(shape_scores(scores, ended, reward_clip=3.0, missing_eos_penalty=1.0),
                               torch.tensor([3.0, 2.0, -4.0, 0.5]))        # penalty not swallowed by the clip
    torch.testing.assert_close(shape_scores(scores, ended), scores)


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    ada = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ada.update(9.0, 64)                          # error 0.5 clipped to 0.2
    assert ada.value == pytest.approx(0.1 * (1 + 0.2 * 64 / 10000))
    ada2 = AdaptiveKLController(0.1, target=6.0, horizon=100)
    ada2.update(5.4, 10)                         # error -0.1
    assert ada2.value == pytest.approx(0.1 * (1 - 0.1 * 10 / 100))
    ada2.load_state_dict(ada.state_dict())
    assert ada2.value == ada.value


def test_policy_loss_clipping_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))   # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    m = torch.ones(1, 3)
    loss, st = policy_loss(new, old, adv, m, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, rel=1e-6)
    assert st["clipfrac"].item() == pytest.approx(1 / 3)
    assert st["approxkl"].item() == pytest.approx(0.5 * float((new ** 2).mean()), rel=1e-6)


def test_value_loss_clipping_by_hand():
    v = torch.tensor([[1.0, 0.0]])
    old = torch.tensor([[0.0, 0.0]])
    ret = torch.tensor([[2.0, 1.0]])
    loss, st = value_loss(v, old, ret, torch.ones(1, 2), cliprange_value=0.5)
    # token 0: max((1-2)^2, (0.5-2)^2) = 2.25; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert st["clipfrac"].item() == pytest.approx(0.5)


def test_masked_tokens_never_count_in_any_loss():
    torch.manual_seed(0)
    B, R = 3, 5
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]).float()
    args = [torch.randn(B, R) for _ in range(6)]            # logp, old, adv, values, old_values, returns
    ent = torch.rand(B, R)

    def run(tensors, e):
        logp = tensors[0].clone().requires_grad_(True)
        values = tensors[3].clone().requires_grad_(True)
        e = e.clone().requires_grad_(True)
        loss, st = ppo_loss(logp, tensors[1], tensors[2], values, tensors[4], tensors[5], m, e,
                            cliprange=0.2, cliprange_value=0.2, vf_coef=0.5, entropy_coef=0.01)
        loss.backward()
        return loss, st, logp.grad, values.grad, e.grad

    base = run(args, ent)
    junk = [torch.where(m.bool(), t, torch.full_like(t, 1e4)) for t in args]
    other = run(junk, torch.where(m.bool(), ent, torch.full_like(ent, 1e4)))
    assert torch.equal(base[0], other[0])
    for k in base[1]:
        assert torch.equal(base[1][k], other[1][k]), k
    for g0, g1 in zip(base[2:], other[2:]):
        assert torch.equal(g0, g1)
        assert torch.all(g0[~m.bool()] == 0)
    assert entropy_bonus(ent, m).item() == pytest.approx(float((ent * m).sum() / m.sum()))
