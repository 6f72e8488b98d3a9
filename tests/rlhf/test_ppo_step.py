"""One PPOTrainer.step against an independent re-derivation of what every minibatch loss must receive.

The pieces (per_token_rewards, whiten, gae, ppo_loss) have their own hand-computed tests; this checks how the
step wires them: the missing-EOS penalty on the score, the score on each row's last real token, −β·KL on every
response token, reward whitening (mean kept) and advantage whitening over the masked tokens only, returns =
raw advantages + old values, the minibatch rows of the rollout matching the rows of every per-token tensor,
each epoch visiting every rollout once, old log-probs equal to the first update's new log-probs, and the
adaptive KL controller fed the batch KL (summed over tokens, mean over rollouts) with n_steps = batch_size.
Expected values are computed row by row in float64 Python, not with the library's helpers.
"""
import math

import pytest
import torch

from hydra_kernels.rlhf import ppo as ppo_mod
from hydra_kernels.rlhf.config import PPOConfig, load_config
from hydra_kernels.rlhf import build_ppo_models, new_reward_head
from tests.rlhf._tiny import CharTokenizer, tiny_model

TOK = CharTokenizer()
PROMPTS = [f"{a}+{b}=" for a in range(5) for b in range(3)]


def reward_fn(prompts, completions, ended):
    return [0.25 * len(c) - 0.5 * sum(ch == "+" for ch in c) + 0.1 * i for i, c in enumerate(completions)]


def _whiten(rows, lengths, shift_mean=True):
    vals = [x for row, n in zip(rows, lengths) for x in row[:n]]
    mean = sum(vals) / len(vals)
    var = sum((x - mean) ** 2 for x in vals) / (len(vals) - 1)
    out = []
    for row, n in zip(rows, lengths):
        w = [(x - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean) for x in row[:n]]
        out.append(w + [0.0] * (len(row) - n))
    return out


def _expected(ro, scores, r_fn, cfg, beta):
    lengths = ro.lengths.tolist()
    ended = ro.ended.tolist()
    kl, values = scores.kl.double().tolist(), scores.values.double().tolist()
    R = ro.response_ids.shape[1]
    score = [x - (0.0 if e else cfg.missing_eos_penalty) for x, e in zip(r_fn, ended)]
    rewards = []
    for i, n in enumerate(lengths):
        row = [-beta * kl[i][t] if t < n else 0.0 for t in range(R)]
        row[n - 1] += score[i]
        rewards.append(row)
    if cfg.whiten_rewards:
        rewards = _whiten(rewards, lengths, shift_mean=False)
    adv, ret = [], []
    for i, n in enumerate(lengths):
        a = [0.0] * R
        nxt_a = 0.0
        for t in reversed(range(n)):
            nxt_v = values[i][t + 1] if t + 1 < n else 0.0
            delta = rewards[i][t] + cfg.gamma * nxt_v - values[i][t]
            nxt_a = delta + cfg.gamma * cfg.lam * nxt_a
            a[t] = nxt_a
        adv.append(a)
        ret.append([a[t] + values[i][t] if t < n else 0.0 for t in range(R)])
    if cfg.whiten_advantages:
        adv = _whiten(adv, lengths)
    return torch.tensor(adv), torch.tensor(ret)


@pytest.mark.parametrize("variant", ("hydra", "lora"))
def test_step_feeds_each_minibatch_loss_the_right_rows(variant, monkeypatch, tmp_path):
    cfg = load_config(PPOConfig, None, [
        f"variant={variant}", "batch_size=6", "mini_batch_size=2", "ppo_epochs=2", "max_new_tokens=5",
        "lr=0.01", "lora.r=4", "lora.alpha=8", "kl_coef=0.3", "adaptive_kl=true", "kl_target=0.05",
        "kl_horizon=100", "whiten_rewards=true", "missing_eos_penalty=0.75", "reward_source=function",
        "gamma=0.9", "lam=0.8", "temperature=0.8", "run.progress=false", f"run.output_dir={tmp_path}"])
    model = tiny_model(len(TOK), seed=0)
    # An EOS that is neither always nor never sampled, so both ended and truncated rows occur.
    with torch.no_grad():
        model.get_output_embeddings().weight[TOK.eos_token_id] = -0.2
    models = build_ppo_models(model, new_reward_head(model, torch.Generator().manual_seed(1)), cfg)
    trainer = ppo_mod.PPOTrainer(models, TOK, PROMPTS, cfg, reward_fn=reward_fn)

    seen, calls = {}, []
    real_score, real_loss, real_pv = models.score, ppo_mod.ppo_loss, models.forward

    def score_spy(ro, **kw):
        s = real_score(ro, **kw)
        seen["ro"], seen["scores"] = ro, s
        return s

    def pv_spy(sub, **kw):
        out = real_pv(sub, **kw)
        seen["sub"] = sub
        return out

    def loss_spy(logp, old, adv, values, old_values, returns, mask, ent, **kw):
        if logp is None:                         # the critic's part of a separate backward (same rows)
            assert values is not None and calls and calls[-1]["sub"] is seen["sub"]
            return real_loss(logp, old, adv, values, old_values, returns, mask, ent, **kw)
        calls.append({"sub": seen["sub"], "logp": logp.detach().clone(), "old": old, "adv": adv,
                      "old_values": old_values, "returns": returns, "mask": mask, "kw": kw})
        return real_loss(logp, old, adv, values, old_values, returns, mask, ent, **kw)

    monkeypatch.setattr(models, "score", score_spy)
    monkeypatch.setattr(models, "forward", pv_spy)
    monkeypatch.setattr(ppo_mod, "ppo_loss", loss_spy)

    beta0 = trainer.kl_ctl.value
    # Step 1 (not 0): the actor moved in step 0, so KL, ratios and values are not trivial.
    trainer.step(0)
    calls.clear()
    beta = trainer.kl_ctl.value
    metrics = trainer.step(1)
    ro, s = seen["ro"], seen["scores"]
    ended = ro.ended.tolist()
    assert 0 < sum(ended) < len(ended), "want both ended and truncated responses"
    assert s.kl.abs().sum() > 0

    texts = ppo_mod.decode_responses(TOK, ro)
    prompts = [PROMPTS[i] for i in ppo_mod.batch_indices(len(PROMPTS), cfg.batch_size, cfg.run.seed, 1)]
    adv, ret = _expected(ro, s, reward_fn(prompts, texts, ended), cfg, beta)

    B, mb = cfg.batch_size, cfg.mini_batch_size
    assert len(calls) == cfg.ppo_epochs * B // mb
    for epoch in range(cfg.ppo_epochs):
        rows_of_epoch = []
        for c in calls[epoch * (B // mb):(epoch + 1) * (B // mb)]:
            # The sub-rollout's rows, found by their tokens, must be the rows of every per-token tensor.
            rows = []
            for k in range(c["sub"].response_ids.shape[0]):
                match = [i for i in range(B) if torch.equal(ro.response_ids[i], c["sub"].response_ids[k])
                         and torch.equal(ro.prompt_ids[i], c["sub"].prompt_ids[k])]
                assert len(match) == 1
                rows.append(match[0])
            rows_of_epoch += rows
            torch.testing.assert_close(c["mask"], ro.response_mask[rows])
            torch.testing.assert_close(c["old"], s.logprobs[rows])
            torch.testing.assert_close(c["old_values"], s.values[rows])
            torch.testing.assert_close(c["adv"].double(), adv[rows].double(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(c["returns"].double(), ret[rows].double(), atol=1e-5, rtol=1e-5)
            assert c["kw"]["cliprange"] == cfg.cliprange and c["kw"]["cliprange_value"] == cfg.cliprange_value
        assert sorted(rows_of_epoch) == list(range(B)), "an epoch must visit every rollout exactly once"
    # Before the first optimizer step of this PPO step the policy is the one that was scored: ratio 1.
    torch.testing.assert_close(calls[0]["logp"], calls[0]["old"], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(calls[-1]["logp"], calls[-1]["old"])
    # Adaptive KL: beta_{k+1} = beta_k (1 + clip(KL/target - 1, ±0.2) · B / horizon), KL summed per rollout.
    kl_batch = float(s.kl.double().sum(1).mean())
    assert metrics["objective/kl"] == pytest.approx(kl_batch, rel=1e-6)
    err = min(max(kl_batch / cfg.kl_target - 1, -0.2), 0.2)
    assert trainer.kl_ctl.value == pytest.approx(beta * (1 + err * B / cfg.kl_horizon), rel=1e-12)
    assert beta != beta0
