"""Hydra-PPO on a Hydra-SFT result, with the learned reward head or your own reward function.

    python python/hydra_ppo.py --sft runs/sft/final --prompts prompts.jsonl --out runs/ppo \
        [--variant hydra] [--steps 100] [--reward-fn my_reward.py:reward] [--config ppo.yaml] [key=value ...]

--sft is the directory python/hydra_sft.py wrote (<out>/final: model + reward_head.safetensors). --sft,
--prompts and --out may instead come from --config (model.path, data.prompt_path, run.output_dir).
prompts.jsonl holds {"prompt"} per line. By default the reward is the SFT reward head (with LoRA off, it is the
reward model). --reward-fn module:function or file.py:function uses your function instead:

    def reward(prompts: list[str], completions: list[str], ended: list[bool]) -> list[float]: ...

(`ended`: the completion stopped at EOS). `--reward-fn example` uses `example_reward` below, which prefers
short answers that end properly; it only shows the shape of such a function.

variant: hydra (one base; actor and critic adapters), j-hydra (one shared adapter), lora (4 models), full.
Writes <out>/metrics.jsonl (TRL metric names), <out>/final (adapters + heads) and, for hydra / j-hydra,
<out>/merged: the trained policy as a plain HF model directory (actor adapter folded into the weights; full: the
actor itself).
Any PPOConfig field can be set as key=value (e.g. kl_coef=0.1 lora.r=8 max_new_tokens=64).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hydra_kernels import rlhf
from hydra_kernels.rlhf import rewards
from hydra_kernels.rlhf.models import load_tokenizer


def example_reward(prompts, completions, ended):
    """An example user reward: +1 for a completion that ends with EOS, minus a little per character."""
    return [(1.0 if e else -1.0) - 0.01 * len(c) for c, e in zip(completions, ended)]


def load_reward_fn(spec: str):
    """"example" (the function above), or module:function / path/to/file.py:function as `hydra-rlhf ppo` takes."""
    return example_reward if spec == "example" else rewards.load_reward_fn(spec, name="--reward-fn")


DEFAULT_OUT = "runs/hydra-ppo"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", help="Hydra-SFT output directory (<sft out>/final; or model.path in --config)")
    ap.add_argument("--prompts", help="prompts JSONL {prompt} (or data.prompt_path)")
    ap.add_argument("--out", default=None, help=f"run.output_dir (default: the config's, else {DEFAULT_OUT})")
    ap.add_argument("--variant", choices=["hydra", "j-hydra", "lora", "full"], default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reward-fn", default=None, help="module:function, file.py:function or 'example'")
    ap.add_argument("--config", default=None, help="JSON/YAML PPOConfig (flags and key=value win over it)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)     # key=value pairs on both sides of the flags

    import torch
    try:
        flags = {"variant": args.variant, "steps": args.steps, "model.path": args.sft,
                 "data.prompt_path": args.prompts, "run.output_dir": args.out,
                 "reward_source": "function" if args.reward_fn else None}
        overrides = rlhf.config.recipe_overrides(args.config, args.overrides, flags, DEFAULT_OUT)
        cfg = rlhf.load_config(rlhf.PPOConfig, args.config, overrides)
        if not cfg.model.path or not cfg.data.prompt_path:
            ap.error("give --sft and --prompts (or model.path and data.prompt_path)")
        reward_fn = load_reward_fn(args.reward_fn) if args.reward_fn else None

        model, reward_head = rlhf.load_sft(cfg.model.path, dtype=getattr(torch, cfg.model.dtype),
                                           trust_remote_code=cfg.model.trust_remote_code)
        tokenizer = load_tokenizer(cfg.model.tokenizer_path or cfg.model.path,
                                   trust_remote_code=cfg.model.trust_remote_code)
        prompts = rlhf.load_prompt_jsonl(cfg.data.prompt_path)

        result = rlhf.train_ppo(model, reward_head, tokenizer, prompts, cfg, reward_fn=reward_fn)
    except ValueError as e:                     # settings, data, reward function: one line, no traceback
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2

    # The SFT policy (LoRA off / the frozen reference) and the PPO policy on a few prompts, same seed.
    shown = prompts[:4]
    before, _ = rlhf.sample_completions(result.models, tokenizer, shown, policy="reference",
                                        max_new_tokens=cfg.max_new_tokens, temperature=0)
    after, _ = rlhf.sample_completions(result.models, tokenizer, shown, policy="actor",
                                       max_new_tokens=cfg.max_new_tokens, temperature=0)
    for p, b, a in zip(shown, before, after):
        print(f"{p!r}\n  SFT: {b!r}\n  PPO: {a!r}")

    info = {"output_dir": str(result.output_dir), "steps": len(result.history), **result.counters}
    info["merged_policy"] = str(result.models.export_policy(Path(cfg.run.output_dir) / "merged", tokenizer))
    last = result.history[-1] if result.history else {}
    info.update({k: last.get(k) for k in ("objective/scores", "objective/kl", "objective/rlhf_reward")})
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
