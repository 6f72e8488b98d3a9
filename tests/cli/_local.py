"""Helpers for the tests in tests/cli: a tiny local model, an SFT directory and JSONL files, and
`python -m hydra_kernels.cli ...` run as a user runs it (a subprocess from the repo root)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SFT_SMALL = ["epochs=1", "batch_size=4", "data.max_prompt_len=16", "data.max_len=24", "run.progress=false"]
PPO_SMALL = ["steps=1", "batch_size=2", "mini_batch_size=2", "ppo_epochs=1", "max_new_tokens=3", "lora.r=2",
             "data.max_prompt_len=16", "run.progress=false"]


def env(**extra) -> dict:
    e = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *extra.pop("pythonpath", [])])}
    e.update(extra)
    return e


def cli(*args, cwd=ROOT, timeout=300, **env_extra) -> subprocess.CompletedProcess:
    """`python -m hydra_kernels.cli *args` -> CompletedProcess (text stdout / stderr)."""
    return subprocess.run([sys.executable, "-m", "hydra_kernels.cli", *map(str, args)], cwd=cwd,
                          env=env(**env_extra), capture_output=True, text=True, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """stderr without transformers' progress bars and warnings."""
    return [line for line in stderr.splitlines()
            if line.strip() and not line.startswith(("Loading weights", "Writing model", "[transformers]"))]


def assert_one_line_error(proc, *needles: str) -> str:
    """The command failed with exit status 2 and one line on stderr, no traceback, containing every needle."""
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1, lines
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_local(root: Path, seed: int = 0) -> dict:
    """A tiny Llama + char tokenizer (model/), an untrained Hydra-SFT directory (sft/), and JSONL files."""
    import torch

    from hydra_kernels import rlhf
    from hydra_kernels.rlhf.demo.model import TinyModelConfig, build_tiny_model, save_model
    from hydra_kernels.rlhf.demo.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                                  max_positions=64), seed=seed)
    save_model(model, tok, root / "model")
    head = rlhf.new_reward_head(model, torch.Generator().manual_seed(seed))
    rlhf.save_sft(root / "sft", rlhf.SFTResult(model, head), tok, rlhf.SFTConfig())
    return {
        "model": root / "model", "sft": root / "sft",
        "demos": write_jsonl(root / "sft.jsonl", [{"prompt": f"{a}+1=", "completion": str(a + 1)}
                                                  for a in range(10, 18)]),
        "pairs": write_jsonl(root / "pref.jsonl", [{"prompt": f"{a}+1=", "chosen": str(a + 1),
                                                    "rejected": str(a + 2)} for a in range(10, 18)]),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": f"{a}+2="} for a in range(10, 18)]),
    }
