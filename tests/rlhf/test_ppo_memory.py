"""What a PPO step keeps alive: the rounded 16-bit adapter copies of the no-grad phases end with them; the update's
saved activations are one role's at a time (separate_backward)."""
import gc
import weakref

import pytest
import torch

from hydra_kernels.nn import context
from hydra_kernels.rlhf import build_ppo_models, new_reward_head
from hydra_kernels.rlhf import losses as ppo_losses
from hydra_kernels.rlhf import ppo as ppo_mod
from hydra_kernels.rlhf.config import PPOConfig, load_config
from tests.rlhf._tiny import CharTokenizer, tiny_model

TOK = CharTokenizer()
PROMPTS = [f"{a}+{b}=" for a in range(5) for b in range(3)]


def _reward(prompts, completions, ended):
    return [0.25 * len(c) for c in completions]


def _trainer(tmp_path, variant="hydra", dtype=torch.bfloat16, extra=()):
    cfg = load_config(PPOConfig, None, [
        f"variant={variant}", "batch_size=4", "mini_batch_size=2", "ppo_epochs=1", "max_new_tokens=4", "lr=0.01",
        "lora.r=4", "lora.alpha=8", "reward_source=function", "run.progress=false", f"run.output_dir={tmp_path}",
        *extra])
    model = tiny_model(len(TOK), seed=0).to(dtype)
    models = build_ppo_models(model, new_reward_head(model, torch.Generator().manual_seed(1)), cfg)
    return ppo_mod.PPOTrainer(models, TOK, PROMPTS, cfg, reward_fn=_reward)


def test_no_rounded_adapter_copy_lives_through_the_update(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path)
    assert trainer.models.hydra.lora_parameters()[0].dtype == torch.float32     # master adapters, bf16 base
    made, alive_at_step = [], []                        # weak references to the copies
    layer = next(iter(trainer.models.hydra.hydra_layers().values()))
    real_operands = context.RoundedScope.operands

    def operands(self, layer, dtype):
        out = real_operands(self, layer, dtype)
        made.append(weakref.ref(out[0]))
        return out
    monkeypatch.setattr(context.RoundedScope, "operands", operands)
    real_step = trainer.optimizer.step

    def step(closure=None):
        gc.collect()
        open_scope = context.rounded_operands(layer, torch.bfloat16)[0] is not layer.lora_A
        alive_at_step.append(sum(ref() is not None for ref in made) + open_scope)
        return real_step(closure)
    monkeypatch.setattr(trainer.optimizer, "step", step)
    trainer.step(0)
    assert made, "the rollout rounds the fp32 adapters of the bf16 model"
    assert alive_at_step == [0, 0]                      # both minibatch updates: no copy, no open scope
    gc.collect()
    assert all(ref() is None for ref in made)


def _sampled_and_recomputed(trainer):
    """A rollout that recorded its old log-probs, its scores, and the scores of the same tokens recomputed."""
    import dataclasses
    cfg = trainer.cfg
    _, ro = trainer.rollout(0)
    assert ro.logprobs is not None and ro.entropy is not None
    kw = dict(temperature=cfg.temperature, kl_estimator=cfg.kl_estimator)
    plain = dataclasses.replace(ro, logprobs=None, entropy=None, values=None)
    return ro, trainer.models.score(ro, **kw), trainer.models.score(plain, **kw)


@pytest.mark.parametrize("variant", ["hydra", "j-hydra", "lora", "full"])
def test_old_logprobs_from_the_rollout_equal_the_recomputed_ones_in_fp32(tmp_path, variant):
    trainer = _trainer(tmp_path, variant, torch.float32, ["old_logprobs=rollout", "temperature=0.7", "top_p=0.9",
                                                          "kl_estimator=k3"])
    ro, got, want = _sampled_and_recomputed(trainer)
    assert (ro.values is not None) == (variant == "j-hydra")          # j-hydra's critic is the policy's stream
    for name in ("logprobs", "ref_logprobs", "kl", "entropy", "values", "scores"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=1e-5, msg=name)
    assert bool((got.logprobs != 0).any()) and bool((got.logprobs[ro.response_mask == 0] == 0).all())


def test_old_logprobs_from_the_rollout_in_bf16_differ_by_the_kv_cache_rounding(tmp_path):
    """bf16: the decoding step's hidden states (KV cache, one token at a time) round differently from the scoring
    forward's. Measured (CPU): tiny model max 4.8e-7 nats; a 512-wide 4-layer Llama (8 x 32 tokens) max 0.093,
    mean 0.0032 nats per token (fp32 there: max 1.3e-6)."""
    trainer = _trainer(tmp_path, "hydra", torch.bfloat16, ["old_logprobs=rollout"])
    ro, got, want = _sampled_and_recomputed(trainer)
    diff = (got.logprobs - want.logprobs).abs().max().item()
    assert diff < 0.1, diff
    torch.testing.assert_close(got.values, want.values)                # the critic stream still runs in scoring


@pytest.mark.parametrize("variant,streams", [("hydra", ("base", "critic")), ("j-hydra", ("base",))])
def test_scoring_with_rollout_logprobs_runs_no_actor_stream(tmp_path, monkeypatch, variant, streams):
    trainer = _trainer(tmp_path, variant, torch.float32, ["old_logprobs=rollout"])
    hydra, seen = trainer.models.hydra, []
    real = hydra.forward_streams

    def spy(ids, mask, streams, *args, **kwargs):
        seen.append(tuple(streams))
        return real(ids, mask, streams, *args, **kwargs)
    monkeypatch.setattr(hydra, "forward_streams", spy)
    trainer.step(0)
    assert seen[0] == streams                                          # scoring; then the update's forwards
    per_minibatch = [("actor",), ("critic",)] if variant == "hydra" else [("actor",)]     # one backward per role
    assert seen[1:] == per_minibatch * 2                               # the two minibatch updates


def test_lora_scoring_with_rollout_logprobs_skips_the_actor_copy(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, "lora", torch.float32, ["old_logprobs=rollout"])
    models, ran = trainer.models, []
    real = type(models)._hidden

    def spy(model, rollout, stream):
        ran.append(model)
        return real(model, rollout, stream)
    monkeypatch.setattr(type(models), "_hidden", staticmethod(spy))
    _, ro = trainer.rollout(0)
    models.score(ro, temperature=1.0, kl_estimator="k1")
    assert ran == [models.reference, models.reward_model, models.critic]


def test_old_logprobs_from_the_rollout_refuse_the_full_kl():
    with pytest.raises(ValueError, match="old_logprobs"):
        load_config(PPOConfig, None, ["old_logprobs=rollout", "kl_estimator=full"])


def _saved_peak_and_trained(tmp_path, variant, separate):
    """One PPO step; the peak bytes of the tensors autograd holds for backward during it, and the trained
    tensors after it."""
    torch.manual_seed(0)                         # the LoRA A matrices are drawn when the model is patched
    trainer = _trainer(tmp_path / str(separate), variant, torch.float32, [f"separate_backward={separate}"])
    live, peak = [0], [0]

    class Saved:                                 # one saved tensor; its bytes count while autograd holds it
        def __init__(self, t):
            self.t, self.n = t, t.untyped_storage().nbytes()
            live[0] += self.n
            peak[0] = max(peak[0], live[0])

        def __del__(self):
            live[0] -= self.n
    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
        trainer.step(0)
    return peak[0], {k: p.detach().clone() for k, p in trainer.params.items()}


@pytest.mark.parametrize("variant", ["hydra", "lora", "full"])
def test_separate_backward_holds_one_role_and_trains_as_the_joint_one(tmp_path, variant):
    sep_peak, sep = _saved_peak_and_trained(tmp_path, variant, True)
    joint_peak, joint = _saved_peak_and_trained(tmp_path, variant, False)
    for k in joint:
        torch.testing.assert_close(sep[k], joint[k], rtol=0, atol=1e-6, msg=k)
    torch.manual_seed(0)
    init = _trainer(tmp_path / "init", variant, torch.float32).params
    assert any(not torch.equal(joint[k], v) for k, v in init.items()), "the step trained nothing"
    # The actor's graph (decoder + LM head) is the larger part: one role alone holds well under the joint total.
    assert sep_peak < 0.75 * joint_peak, (sep_peak, joint_peak)


def test_j_hydra_runs_one_backward_either_way(tmp_path):
    peaks = [_saved_peak_and_trained(tmp_path, "j-hydra", s)[0] for s in (True, False)]
    assert peaks[0] == peaks[1]


def test_ppo_loss_parts_sum_to_the_joint_loss():
    g = torch.Generator().manual_seed(0)
    a, b, c, d, e, f = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(6))
    mask = (torch.rand(3, 5, generator=g) > 0.3).double()
    ent = torch.rand(3, 5, generator=g, dtype=torch.float64)
    kw = dict(cliprange=0.2, cliprange_value=0.3, vf_coef=0.1, entropy_coef=0.01)
    joint, st = ppo_losses.ppo_loss(a, b, c, d, e, f, mask, ent, **kw)
    pol, st_p = ppo_losses.ppo_loss(a, b, c, None, e, f, mask, ent, **kw)
    val, st_v = ppo_losses.ppo_loss(None, b, c, d, e, f, mask, ent, **kw)
    torch.testing.assert_close(pol + val, joint)
    assert set(st_p) | set(st_v) == set(st) and set(st_p) & set(st_v) == {"loss/total"}
    with pytest.raises(ValueError, match="logprobs"):
        ppo_losses.ppo_loss(None, b, c, None, e, f, mask, **kw)
