"""Critic-free RL (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++) on one base, with your reward functions.

    python python/hydra_grpo.py --model runs/sft/final --prompts prompts.jsonl --out runs/grpo \
        [--estimator dapo] [--steps 100] [--reward-fn my_reward.py:reward ...] [--config grpo.yaml] [key=value ...]

--model is a Hydra-SFT output (<sft out>/final: its reward head can be the reward) or any local causal LM
directory. prompts.jsonl holds {"prompt", ...} per line; the other fields reach TRL-style reward functions as
keyword arguments. --reward-fn module:function or file.py:function, repeatable (weighted by
reward_weights=[...]), in either signature:

    def reward(prompts: list[str], completions: list[str], ended: list[bool]) -> list[float]: ...   # PPO's
    def reward(prompts, completions, **kwargs) -> list[float]: ...    # TRL's: completion_ids, ended, columns

`--reward-fn example` uses `example_reward` below. Without a function, reward_model=DIR (a sequence-
classification model) or the Hydra-SFT reward head is the reward. Writes <out>/metrics.jsonl (TRL's GRPOTrainer
metric names), <out>/final (the adapter) and <out>/merged, the trained policy as a plain HF model directory.
Any GRPOConfig field can be set as key=value (e.g. num_generations=8 beta=0.04 lora.r=8 max_new_tokens=64); the
ones left null take the estimator's preset.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hydra_kernels import rlhf
from hydra_kernels.rlhf import rewards
from hydra_kernels.rlhf.data import load_prompt_data
from hydra_kernels.rlhf.models import load_tokenizer


def example_reward(prompts, completions, **kwargs):
    """An example TRL-style reward: +1 for a completion that ends with EOS, minus a little per character."""
    return [(1.0 if e else -1.0) - 0.01 * len(c) for c, e in zip(completions, kwargs["ended"])]


def load_reward_fn(spec: str):
    """"example" (the function above), or module:function / path/to/file.py:function as `hydra-rlhf grpo` takes."""
    return example_reward if spec == "example" else rewards.load_reward_fn(spec, name="--reward-fn")


DEFAULT_OUT = "runs/hydra-grpo"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="Hydra-SFT output directory or a causal LM directory (or model.path)")
    ap.add_argument("--prompts", help="prompts JSONL {prompt, ...} (or data.prompt_path)")
    ap.add_argument("--out", default=None, help=f"run.output_dir (default: the config's, else {DEFAULT_OUT})")
    ap.add_argument("--estimator", choices=rlhf.ESTIMATORS, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reward-fn", action="append", default=None,
                    help="module:function, file.py:function or 'example'; repeatable")
    ap.add_argument("--config", default=None, help="JSON/YAML GRPOConfig (flags and key=value win over it)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)     # key=value pairs on both sides of the flags

    import torch
    try:
        flags = {"estimator": args.estimator, "steps": args.steps, "model.path": args.model,
                 "data.prompt_path": args.prompts, "run.output_dir": args.out,
                 "reward_source": "function" if args.reward_fn else None}
        overrides = rlhf.config.recipe_overrides(args.config, args.overrides, flags, DEFAULT_OUT)
        cfg = rlhf.load_config(rlhf.GRPOConfig, args.config, overrides)
        if not cfg.model.path or not cfg.data.prompt_path:
            ap.error("give --model and --prompts (or model.path and data.prompt_path)")
        fns = [load_reward_fn(spec) for spec in args.reward_fn or ()]
        if os.path.isfile(os.path.join(cfg.model.path, "sft.json")):         # a Hydra-SFT result
            model, head = rlhf.load_sft(cfg.model.path, dtype=getattr(torch, cfg.model.dtype))
            tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path)
        else:
            head = None
            model, tokenizer = rlhf.load_model_and_tokenizer(cfg.model)
            rlhf.add_pad_token(tokenizer, model)
        prompts = load_prompt_data(cfg.data.prompt_path, tokenizer)     # rows: their columns reach reward functions
        result = rlhf.train_grpo(model, tokenizer, prompts, cfg, reward_fn=fns or None, reward_head=head)
    except ValueError as e:                     # settings, data, reward function: one line, no traceback
        if rewards.raised_by_reward_fn(e):
            raise                               # a bug inside the reward function: its own traceback
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2

    # The reference policy (LoRA off) and the trained policy on a few prompts, greedy.
    shown = prompts.prompts[:4]
    before, _ = rlhf.sample_completions(result.models, tokenizer, shown, policy="reference",
                                        max_new_tokens=cfg.max_new_tokens, temperature=0)
    after, _ = rlhf.sample_completions(result.models, tokenizer, shown, policy="actor",
                                       max_new_tokens=cfg.max_new_tokens, temperature=0)
    for p, b, a in zip(shown, before, after):
        print(f"{p!r}\n  before: {b!r}\n  after:  {a!r}")

    result.models.hydra.tokenizer = tokenizer
    info = {"output_dir": str(result.output_dir), "steps": len(result.history), **result.counters,
            "merged_policy": str(result.models.hydra.merge("actor", Path(cfg.run.output_dir) / "merged"))}
    last = result.history[-1] if result.history else {}
    info.update({k: last.get(k) for k in ("reward", "reward_std", "kl", "completions/mean_length")})
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
