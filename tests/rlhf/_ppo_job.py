"""A small PPO run on the tiny model; importable, and runnable as a script (for the kill/resume test).

    python -m tests.rlhf._ppo_job OUT_DIR [--hang-after N] [key=value ...]
"""
from __future__ import annotations

import sys
import time

import torch

from hydra_kernels.rlhf.config import PPOConfig, load_config
from hydra_kernels.integrations.hydra_model import new_reward_head
from hydra_kernels.rlhf.ppo import train_ppo
from tests.rlhf._tiny import CharTokenizer, tiny_model

PROMPTS = [f"{a}+{b}=" for a in range(7) for b in range(3)]
BASE_OVERRIDES = ["steps=2", "batch_size=4", "mini_batch_size=2", "ppo_epochs=1", "max_new_tokens=4", "lr=0.01",
                  "lora.r=4", "lora.alpha=8", "run.progress=false", "run.checkpoint_every=1"]


def digit_reward(prompts, completions, ended):
    """A cheap programmatic reward: + for digits, − for anything else, − for no EOS."""
    return [sum(1.0 if ch.isdigit() else -1.0 for ch in c) / 4 - (0.0 if e else 0.5)
            for c, e in zip(completions, ended)]


def run(out_dir, overrides=(), reward_fn=None, gold_reward_fn=digit_reward, callback=None, model_seed=0):
    tok = CharTokenizer()
    model = tiny_model(len(tok), seed=model_seed)
    head = new_reward_head(model, torch.Generator().manual_seed(1))
    cfg = load_config(PPOConfig, None, [*BASE_OVERRIDES, f"run.output_dir={out_dir}", *overrides])
    return model, train_ppo(model, head, tok, PROMPTS, cfg, reward_fn=reward_fn, gold_reward_fn=gold_reward_fn,
                            callback=callback)


if __name__ == "__main__":
    args = sys.argv[1:]
    out, rest = args[0], args[1:]
    hang_after = None
    if rest and rest[0] == "--hang-after":
        hang_after, rest = int(rest[1]), rest[2:]

    def hang(step, metrics):
        if hang_after is not None and step == hang_after:
            print("HANGING", flush=True)
            time.sleep(600)          # the test kills us here, after the checkpoint of this step

    run(out, rest, callback=hang)
    print("DONE", flush=True)
