"""What a PPO step keeps alive: the rounded 16-bit adapter copies of the no-grad phases end with them."""
import gc
import weakref

import pytest
import torch

from hydra_kernels.nn import context
from hydra_kernels.rlhf import build_ppo_models, new_reward_head
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
