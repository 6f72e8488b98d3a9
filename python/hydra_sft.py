"""Hydra-SFT on a local checkpoint: one model, LM head + reward head, trained jointly on your JSONL.

    python python/hydra_sft.py --model path/to/hf_model --sft demos.jsonl --pref pairs.jsonl --out runs/sft \
        [--mode lora] [--epochs 3] [--lr 1e-4] [--config sft.yaml] [key=value ...]

Inputs (one JSON object per line):  demos.jsonl {"prompt", "completion"};  pairs.jsonl {"prompt", "chosen",
"rejected"}. Either may be left out. --model is a local Hugging Face causal-LM directory (with its tokenizer);
nothing is downloaded. A tokenizer without a pad token distinct from EOS gets one. --model, --sft, --pref and
--out may instead come from --config (model.path, data.sft_path, data.preference_path, run.output_dir).

Loss: LM on demonstrations (and on chosen responses) + reward_coef · Bradley–Terry on pairs. --mode lora trains
a LoRA adapter and merges it into the base at the end, so the result's base IS the SFT model (what PPO's
"LoRA off" needs). The result goes to <out>/final: an HF model directory + reward_head.safetensors; pass it to
python/hydra_ppo.py --sft. Any SFTConfig field can be set as key=value (e.g. lora.r=8 data.max_len=512).
"""
from __future__ import annotations

import argparse
import json
import sys

from hydra_kernels import rlhf

DEFAULT_OUT = "runs/hydra-sft"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="local HF causal-LM directory (or model.path in --config)")
    ap.add_argument("--sft", help="demonstrations JSONL {prompt, completion} (or data.sft_path)")
    ap.add_argument("--pref", help="preference pairs JSONL {prompt, chosen, rejected} (or data.preference_path)")
    ap.add_argument("--out", default=None, help=f"run.output_dir (default: the config's, else {DEFAULT_OUT})")
    ap.add_argument("--mode", choices=["full", "lora"], default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--config", default=None, help="JSON/YAML SFTConfig (flags and key=value win over it)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_intermixed_args(argv)     # key=value pairs on both sides of the flags
    try:
        flags = {"mode": args.mode, "epochs": args.epochs, "lr": args.lr, "model.path": args.model,
                 "data.sft_path": args.sft, "data.preference_path": args.pref, "run.output_dir": args.out}
        overrides = rlhf.config.recipe_overrides(args.config, args.overrides, flags, DEFAULT_OUT)
        cfg = rlhf.load_config(rlhf.SFTConfig, args.config, overrides)
        if not cfg.model.path:
            ap.error("give --model (or model.path)")
        if not cfg.data.sft_path and not cfg.data.preference_path:
            ap.error("give --sft and/or --pref (or data.sft_path / data.preference_path)")

        model, tokenizer = rlhf.load_model_and_tokenizer(cfg.model)
        rlhf.add_pad_token(tokenizer, model)    # pad must differ from EOS (reward positions, value targets)
        demos = rlhf.load_sft_jsonl(cfg.data.sft_path) if cfg.data.sft_path else []
        pairs = rlhf.load_preference_jsonl(cfg.data.preference_path) if cfg.data.preference_path else []

        # Held-out pairs: data.eval_fraction of the pairs (default 10%) measure reward accuracy after every epoch.
        result = rlhf.hydra_sft(model, tokenizer, demos, pairs, cfg)
    except ValueError as e:                     # settings and data: one line, no traceback
        print(f"{ap.prog}: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"output_dir": str(result.output_dir), **result.metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
