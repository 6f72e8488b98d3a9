"""A small critic-free run on the tiny model; importable, and runnable as a script (for the kill/resume test).

    python -m tests.rlhf._grpo_job OUT_DIR [--hang-after N] [key=value ...]
"""
from __future__ import annotations

import sys
import time

from hydra_kernels.rlhf.config import GRPOConfig, load_config
from hydra_kernels.rlhf.grpo import train_grpo
from tests.rlhf._ppo_job import PROMPTS, digit_reward
from tests.rlhf._tiny import CharTokenizer, tiny_model

BASE_OVERRIDES = ["steps=2", "batch_size=8", "num_generations=4", "max_new_tokens=4", "lr=0.01", "lora.r=4",
                  "lora.alpha=8", "run.progress=false", "run.checkpoint_every=1"]


def run(out_dir, overrides=(), reward_fn=digit_reward, callback=None, model_seed=0, **kwargs):
    tok = CharTokenizer()
    model = tiny_model(len(tok), seed=model_seed)
    cfg = load_config(GRPOConfig, None, [*BASE_OVERRIDES, f"run.output_dir={out_dir}", *overrides])
    return model, train_grpo(model, tok, kwargs.pop("prompts", PROMPTS), cfg, reward_fn=reward_fn,
                             callback=callback, **kwargs)


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
