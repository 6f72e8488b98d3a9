"""Hydra-SFT on a local checkpoint: one model, LM head + reward head, trained jointly on your JSONL.

    python python/hydra_sft.py --model path/to/hf_model --sft demos.jsonl --pref pairs.jsonl --out runs/sft \
        [--mode lora] [--epochs 3] [--lr 1e-4] [--config sft.yaml] [key=value ...]

Inputs (one JSON object per line):  demos.jsonl {"prompt", "completion"};  pairs.jsonl {"prompt", "chosen",
"rejected"}. Either may be left out. --model is a local Hugging Face causal-LM directory (with its tokenizer);
nothing is downloaded. A tokenizer without a pad token distinct from EOS gets one.

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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local HF causal-LM directory")
    ap.add_argument("--sft", help="demonstrations JSONL {prompt, completion}")
    ap.add_argument("--pref", help="preference pairs JSONL {prompt, chosen, rejected}")
    ap.add_argument("--out", default="runs/hydra-sft")
    ap.add_argument("--mode", choices=["full", "lora"], default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--config", default=None, help="JSON/YAML SFTConfig (flags and key=value win over it)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    if not args.sft and not args.pref:
        ap.error("give --sft and/or --pref")

    flags = {"mode": args.mode, "epochs": args.epochs, "lr": args.lr}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
    overrides += [f"model.path={args.model}", f"run.output_dir={args.out}"]
    cfg = rlhf.load_config(rlhf.SFTConfig, args.config, overrides + list(args.overrides))

    model, tokenizer = rlhf.load_model_and_tokenizer(cfg.model)
    rlhf.add_pad_token(tokenizer, model)        # pad must differ from EOS (reward positions, value targets)
    demos = rlhf.load_sft_jsonl(args.sft) if args.sft else []
    pairs = rlhf.load_preference_jsonl(args.pref) if args.pref else []

    # Held-out pairs: data.eval_fraction of the pairs (default 10%) measure reward accuracy after every epoch.
    result = rlhf.hydra_sft(model, tokenizer, demos, pairs, cfg)
    print(json.dumps({"output_dir": str(result.output_dir), **result.metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
