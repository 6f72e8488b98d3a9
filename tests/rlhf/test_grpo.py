"""The critic-free step (rlhf.grpo) end to end on a tiny model: every estimator trains the actor adapter only; step 0
has ratio exactly 1 and KL exactly 0; the scoring pass runs only the streams a setting needs, and its fused
(base, actor) forward equals separate forwards; groups, presets, G not dividing the batch, filtering, non-finite
rewards, dataset columns, the reward head; a killed run resumes to the same result."""
import json

import pytest
import torch
from safetensors.torch import load_file

from hydra_kernels import ops
from hydra_kernels.integrations.hydra_model import lm_head_weight
from hydra_kernels.kernels.kl import sampled_kl
from hydra_kernels.rlhf import estimators, grpo as grpo_mod
from hydra_kernels.rlhf.config import GRPOConfig, apply_overrides, config_to_dict, load_config
from hydra_kernels.rlhf.rewards import build_rewards
from hydra_kernels.rlhf.rollout import decode_responses
from hydra_kernels.rlhf.scoring import IGNORE_INDEX, logits_f32, response_hidden, response_targets
from hydra_kernels.rlhf.variants import build_critic_free
from tests._util import kill_job_when
from tests.rlhf._grpo_job import BASE_OVERRIDES, run
from tests.rlhf._ppo_job import PROMPTS, digit_reward
from tests.rlhf._tiny import CharTokenizer, tiny_model
from tests.rlhf.test_estimators import trl_grpo_advantages

TOK = CharTokenizer()
TRL_NAMES = ("reward", "reward_std", "frac_reward_zero_std", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
             "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio", "num_tokens", "loss",
             "grad_norm", "rewards/digit_reward/mean")


def _trainer(overrides=(), reward_fn=digit_reward, eos_logit=None, prompts=PROMPTS, reward_head=None, tmp="/tmp"):
    cfg = load_config(GRPOConfig, None, [*BASE_OVERRIDES, f"run.output_dir={tmp}", *overrides])
    model = tiny_model(len(TOK), seed=0)
    if eos_logit is not None:               # an EOS that is sampled now and then: ended and truncated rows
        with torch.no_grad():
            model.get_output_embeddings().weight[TOK.eos_token_id] = eos_logit
    models = build_critic_free(model, reward_head, cfg)
    source = grpo_mod.reward_source(cfg, reward_fn, reward_head)
    rewards = build_rewards(source, reward_fn if source == "function" else None)
    return grpo_mod.GRPOTrainer(models, TOK, prompts, cfg, rewards=rewards), models


def _lora_B(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("lora_B")}


@pytest.mark.parametrize("estimator", estimators.ESTIMATORS)
def test_each_estimator_trains_the_adapter_and_leaves_the_base_unchanged(tmp_path, estimator):
    before = {k: v.clone() for k, v in tiny_model(len(TOK)).state_dict().items()}
    model, res = run(tmp_path, [f"estimator={estimator}", "mask_truncated=false", "run.checkpoint_every=0"])
    assert len(res.history) == 2 and res.counters == {"skipped/nonfinite_reward": 0, "skipped/nonfinite_loss": 0}
    for h in res.history:
        missing = [k for k in TRL_NAMES if k not in h or h[k] is None]
        assert not missing, missing
    first = res.history[0]
    assert first["clip_ratio/region_mean"] == 0.0                       # step 0: the policy that sampled
    if res.models.hydra is not None and cfg_beta(estimator) > 0:
        assert first["kl"] == 0.0
    for name, p in res.models.model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, before[name]), name
    assert any(B.abs().sum() > 0 for B in _lora_B(res.models.model).values()), "the actor adapter did not move"
    assert res.models.value_head is None and set(res.models.named_trainable()) == {
        f"model.{n}" for n, _ in res.models.model.named_parameters() if "lora_" in n}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    meta = json.loads((tmp_path / "final" / "policy.json").read_text())
    assert meta["variant"] == "critic-free" and meta["config"]["estimator"] == estimator


def cfg_beta(estimator):
    return GRPOConfig(estimator=estimator, num_generations=4, batch_size=8).resolved().beta


@pytest.mark.parametrize("overrides", [["beta=0.1"], ["beta=0.1", "num_iterations=2"],
                                       ["beta=0.1", "mini_batch_size=4"], ["estimator=rloo"],
                                       ["estimator=reinforce_pp", "kl_estimator=k3"],
                                       ["beta=0.1", "kl_estimator=k2", "kl_in=reward"]])
def test_step_zero_has_ratio_exactly_one_and_kl_exactly_zero(tmp_path, monkeypatch, overrides):
    trainer, _ = _trainer(overrides, tmp=tmp_path)
    calls = []
    real = grpo_mod.clipped_token_loss if "estimator=rloo" not in overrides else grpo_mod.sequence_clipped_loss
    name = "clipped_token_loss" if "estimator=rloo" not in overrides else "sequence_clipped_loss"

    def spy(logp, old, *args, **kw):
        calls.append((logp.detach().clone(), old.detach().clone()))
        return real(logp, old, *args, **kw)

    monkeypatch.setattr(grpo_mod, name, spy)
    m = trainer.step(0)
    logp, old = calls[0]
    assert torch.equal(logp, old)                                       # the first minibatch: ρ = 1 exactly
    if trainer.cfg.num_iterations == 1 and trainer.mini_batch_size == trainer.cfg.batch_size:
        assert m["kl"] == 0.0
    assert m["clip_ratio/region_mean"] == 0.0 or len(calls) > 1


def test_step_zero_kl_is_exactly_zero_in_the_first_minibatch(tmp_path, monkeypatch):
    """With μ = 2 the second pass runs after an optimizer step; its KL is not 0, the first pass's is."""
    trainer, _ = _trainer(["beta=0.1", "num_iterations=2"], tmp=tmp_path)
    kls = []
    real = grpo_mod.sampled_kl

    def spy(d, est):
        out = real(d, est)
        kls.append(out.detach().clone())
        return out

    monkeypatch.setattr(grpo_mod, "sampled_kl", spy)
    trainer.step(0)
    assert len(kls) == 2 and torch.equal(kls[0], torch.zeros_like(kls[0])) and kls[1].abs().sum() > 0


@pytest.mark.parametrize("overrides, streams", [
    (["beta=0"], []),                                        # μ = 1, no KL: the old log-probs are the current ones
    (["beta=0.1"], [("base",)]),                             # KL in the loss: only the reference's log-probs
    (["beta=0", "num_iterations=2"], [("actor",)]),          # old log-probs for the second pass
    (["beta=0", "mini_batch_size=4"], [("actor",)]),         # two optimizer steps per rollout
    (["beta=0.1", "num_iterations=2"], [("base", "actor")]),
    (["estimator=rloo"], [("base", "actor")]),               # KL in the reward: needed before the update
    (["estimator=dr_grpo", "reward_source=head"], [("base",)]),   # the reward head reads the base stream
])
def test_scoring_forwards_only_the_streams_needed(tmp_path, monkeypatch, overrides, streams):
    head = torch.nn.Linear(32, 1) if "reward_source=head" in overrides else None
    fn = None if head is not None else digit_reward
    trainer, models = _trainer(overrides, reward_fn=fn, reward_head=head, tmp=tmp_path)
    seen = []
    real = models.hydra.forward_streams

    def spy(ids, mask, names, pos=None):
        seen.append((tuple(names), torch.is_grad_enabled()))
        return real(ids, mask, names, pos)

    monkeypatch.setattr(models.hydra, "forward_streams", spy)
    trainer.step(0)
    assert [s for s, grad in seen if not grad] == streams
    assert {s for s, grad in seen if grad} == {("actor",)}         # the update forward: the actor alone


def test_fused_scoring_equals_separate_forwards(tmp_path):
    """One forward of (base, actor) and one LM-head sweep give the log-probs, entropy and KL of two separate
    forwards bit for bit (and the KL of materialised logits within fp32 rounding), after the adapter moved."""
    trainer, models = _trainer(["beta=0.1", "num_iterations=2"], eos_logit=-0.2, tmp=tmp_path)
    trainer.step(0)
    _, ro = trainer.rollout(1)
    fused = models.score_policies(ro, actor=True, reference=True, reward=True, temperature=0.7, kl_estimator="k3")
    m = ro.response_mask.float()
    W, targets = lm_head_weight(models.model), response_targets(ro)
    sep = {}
    with torch.no_grad():
        for name in ("actor", "base"):
            h = models.hydra.forward_streams(ro.input_ids, ro.attention_mask, (name,), ro.position_ids)
            lp, ent, _ = ops.linear_logprobs([response_hidden(h, ro)[0]], W, targets, temperature=0.7, kl=None,
                                             ignore_index=IGNORE_INDEX)
            sep[name] = (lp[0] * m, ent[0] * m, h[0])
        full = ops.logprobs_and_kl(logits_f32(models.model, response_hidden(sep["actor"][2], ro)),
                                   logits_f32(models.model, response_hidden(sep["base"][2], ro)), targets, 0.7, "k3",
                                   IGNORE_INDEX)
    assert torch.equal(fused.logprobs, sep["actor"][0]) and torch.equal(fused.entropy, sep["actor"][1])
    assert torch.equal(fused.ref_logprobs, sep["base"][0])
    assert torch.equal(fused.kl, sampled_kl(sep["base"][0] - sep["actor"][0], "k3") * m)
    assert torch.equal(fused.scores, models.hydra.reward(sep["base"][2], ro.attention_mask))
    assert fused.kl.abs().sum() > 0                                     # the adapter moved: a real comparison
    torch.testing.assert_close(fused.kl, full[2] * m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused.logprobs, full[0] * m, rtol=1e-5, atol=1e-6)


def test_step_feeds_the_loss_trl_advantages_of_the_group(tmp_path, monkeypatch):
    """The advantage each minibatch row receives is TRL's group advantage of the rewards of its completion."""
    trainer, _ = _trainer(["mini_batch_size=4", "scale_rewards=group"], eos_logit=-0.2, tmp=tmp_path)
    got = []
    real = grpo_mod.clipped_token_loss
    monkeypatch.setattr(grpo_mod, "clipped_token_loss", lambda lp, old, adv, *a: got.append(adv) or real(lp, old,
                                                                                                           adv, *a))
    seen = {}
    real_rollout = trainer.rollout

    def rollout_spy(step):
        seen["idx"], seen["ro"] = real_rollout(step)
        return seen["idx"], seen["ro"]

    monkeypatch.setattr(trainer, "rollout", rollout_spy)
    gen = torch.Generator().manual_seed(grpo_mod.derived_seed(0, 0, 3))
    trainer.step(0)
    ro = seen["ro"]
    texts = decode_responses(TOK, ro)
    rewards = torch.tensor(digit_reward([PROMPTS[i] for i in seen["idx"]], texts, ro.ended.tolist()),
                           dtype=torch.float32)
    want, _ = trl_grpo_advantages(rewards, 4, "group")
    order = torch.randperm(8, generator=gen)
    assert torch.allclose(torch.cat(got), want[order], rtol=1e-6, atol=1e-6)
    # The rows of a group are one prompt, repeated.
    assert seen["idx"][:4] == [seen["idx"][0]] * 4 and seen["idx"][4:] == [seen["idx"][4]] * 4
    assert torch.equal(ro.prompt_ids[0], ro.prompt_ids[3])


def test_batch_size_not_divisible_by_num_generations_is_refused():
    for make in (lambda: GRPOConfig(batch_size=10, num_generations=4),
                 lambda: load_config(GRPOConfig, None, ["batch_size=10", "num_generations=4"])):
        with pytest.raises(ValueError, match=r"^batch_size: .*num_generations \(4\).*batch_size=10"):
            make()
    with pytest.raises(ValueError, match="^num_generations: .*grpo"):
        GRPOConfig(batch_size=4, num_generations=1)
    GRPOConfig(estimator="reinforce_pp", batch_size=4, num_generations=1)      # no group needed
    with pytest.raises(ValueError, match="^mini_batch_size"):
        GRPOConfig(batch_size=16, num_generations=4, mini_batch_size=6)


def test_preset_and_explicit_values():
    """A null field takes the estimator's preset; an explicit value wins; switching the estimator of a config
    moves its null fields to the new preset and keeps the explicit ones."""
    dapo = GRPOConfig(estimator="dapo", max_new_tokens=100)
    s = dapo.resolved()
    assert (s.cliprange_low, s.cliprange_high, s.beta, s.loss_agg, s.filter_groups, s.mask_truncated,
            s.overlong_buffer) == (0.2, 0.28, 0.0, "token-mean", True, True, 20)
    assert config_to_dict(dapo)["cliprange_high"] is None                    # the preset is not frozen in
    mine = GRPOConfig(estimator="dapo", cliprange_high=0.3, beta=0.05, filter_groups=False)
    s = mine.resolved()
    assert (s.cliprange_high, s.beta, s.filter_groups, s.cliprange_low) == (0.3, 0.05, False, 0.2)
    grpo = apply_overrides(mine, ["estimator=grpo"]).resolved()
    assert (grpo.cliprange_high, grpo.beta, grpo.filter_groups, grpo.loss_agg) == (0.3, 0.05, False,
                                                                                 "seq-mean-token-mean")
    assert apply_overrides(dapo, ["estimator=grpo"]).resolved().cliprange_high == 0.2
    assert GRPOConfig(estimator="dr_grpo").resolved().loss_agg_constant == 256
    with pytest.raises(ValueError, match="^scale_rewards: .*rloo"):
        GRPOConfig(estimator="rloo", scale_rewards="group")
    with pytest.raises(ValueError, match="^kl_estimator"):
        GRPOConfig(beta=0.1, kl_estimator="full")
    GRPOConfig(beta=0.1, kl_estimator="full", kl_in="reward")
    with pytest.raises(ValueError, match="^loss_agg"):
        GRPOConfig(estimator="reinforce_pp", loss_agg="sequence")
    with pytest.raises(ValueError, match="^overlong_buffer"):
        GRPOConfig(max_new_tokens=8, overlong_buffer=9)


def test_groups_of_equal_rewards_are_dropped(tmp_path):
    """dapo's filter_groups: a constant reward leaves no group with a signal: no optimizer step, nothing moves."""
    _, res = run(tmp_path, ["estimator=dapo", "steps=1", "overlong_buffer=0"],
                 reward_fn=lambda p, c, e: [0.5] * len(p))
    h = res.history[0]
    assert h["frac_reward_zero_std"] == 1.0 and h["optimizer_steps"] == 0 and h["loss"] is None
    assert all(torch.equal(B, torch.zeros_like(B)) for B in _lora_B(res.models.model).values())


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_truncated_completions_are_masked(tmp_path, monkeypatch, estimator):
    trainer, _ = _trainer(["mask_truncated=true", f"estimator={estimator}"], eos_logit=0.5, tmp=tmp_path)
    masks = []
    real = grpo_mod.aggregate_loss
    monkeypatch.setattr(grpo_mod, "aggregate_loss", lambda per, mask, *a, **k: masks.append(mask) or real(per, mask,
                                                                                                       *a, **k))
    seen = {}
    real_rollout = trainer.rollout
    monkeypatch.setattr(trainer, "rollout", lambda s: seen.setdefault("r", real_rollout(s)))
    trainer.step(0)
    ro = seen["r"][1]
    assert 0 < int(ro.ended.sum()) < 8
    order = torch.randperm(8, generator=torch.Generator().manual_seed(grpo_mod.derived_seed(0, 0, 3)))
    assert torch.equal(masks[0], ro.response_mask[order] * ro.ended[order, None])


def test_nonfinite_reward_skips_the_batch(tmp_path):
    calls = []

    def flaky(prompts, completions, ended):
        calls.append(1)
        r = digit_reward(prompts, completions, ended)
        return [float("nan")] * len(r) if len(calls) == 1 else r

    with pytest.warns(RuntimeWarning, match="non-finite reward"):
        _, res = run(tmp_path, [], reward_fn=flaky)
    assert res.counters["skipped/nonfinite_reward"] == 1
    assert res.history[0]["skipped"] is True and res.history[0]["reward"] is None
    assert res.history[1]["skipped"] is False


def test_dataset_columns_and_completion_ids_reach_a_trl_reward_function(tmp_path):
    rows = [{"prompt": p, "answer": str(eval(p[:-1]))} for p in PROMPTS]
    seen = []

    def accuracy(completions, answer, completion_ids, prompts, **kwargs):
        seen.append((list(prompts), list(answer), list(completions), completion_ids, kwargs))
        return [float(c == a) for c, a in zip(completions, answer)]

    _, res = run(tmp_path, ["steps=1"], reward_fn=accuracy, prompts=rows)
    prompts, answers, completions, ids, kwargs = seen[0]
    assert [str(eval(p[:-1])) for p in prompts] == answers                 # each row's own column value
    assert set(kwargs) == {"ended"} and len(kwargs["ended"]) == 8
    assert [TOK.decode(i) for i in ids] == completions
    assert "rewards/accuracy/mean" in res.history[0]
    with pytest.raises(ValueError, match="prompts: row 1"):
        run(tmp_path / "b", ["steps=1"], reward_fn=accuracy, prompts=[rows[0], {"prompt": "1+1="}])


def test_reward_head_is_read_from_the_scoring_forward(tmp_path):
    head = torch.nn.Linear(32, 1)
    with torch.no_grad():
        head.weight.normal_(generator=torch.Generator().manual_seed(3))
    _, res = run(tmp_path, ["steps=1"], reward_fn=None, reward_head=head)
    h = res.history[0]
    assert "rewards/reward_head/mean" in h and h["reward"] == pytest.approx(h["rewards/reward_head/mean"])
    with pytest.raises(ValueError, match="^reward_fn: no reward"):
        run(tmp_path / "none", ["steps=1"], reward_fn=None)


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    kill_job_when(killed / "checkpoints" / "step-00000002" / "state.json", "tests.rlhf._grpo_job", str(killed),
                  "--hang-after", "2", "steps=4", "beta=0.1", "num_iterations=2")
    assert not (killed / "final").exists()
    _, resumed = run(killed, ["steps=4", "beta=0.1", "num_iterations=2"])
    _, straight = run(tmp_path / "straight", ["steps=4", "beta=0.1", "num_iterations=2"])

    def comparable(history):
        return [{k: v for k, v in h.items() if not k.startswith(("time/", "memory/"))} for h in history]

    assert [h["step"] for h in resumed.history] == [1, 2, 3, 4]
    assert comparable(resumed.history) == comparable(straight.history)
    a = load_file(str(killed / "final/policy.safetensors"))
    b = load_file(str(tmp_path / "straight/final/policy.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_other_estimator_settings(tmp_path):
    run(tmp_path, ["steps=1"])
    with pytest.raises(ValueError, match="run.output_dir: .*estimator: 'grpo' there, 'dapo' here"):
        run(tmp_path, ["steps=2", "estimator=dapo"])
    run(tmp_path, ["steps=2"])                                               # more steps: resumes
