"""The python/ recipes on a tiny local model: called in-process, and run as a user runs them (a subprocess, with
--config: the config's paths, output dir and dtype are used; errors are one line)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hydra_kernels.rlhf.demo.model import TinyModelConfig, build_tiny_model, save_model
from hydra_kernels.rlhf.demo.task import ArithmeticTask, TaskConfig
from hydra_kernels.rlhf.demo.tokenizer import build_char_tokenizer
from tests.cli._local import assert_one_line_error, env, make_local

ROOT = Path(__file__).resolve().parents[1]


def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "python" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A tiny Llama + char tokenizer saved as a local HF directory, and small JSONL files."""
    root = tmp_path_factory.mktemp("recipes")
    tok = build_char_tokenizer()
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64))
    save_model(model, tok, root / "model")
    paths = ArithmeticTask(TaskConfig(n_sft=32, n_pref=32, n_ppo=16, n_eval_prompts=8, n_eval_pairs=8)).write(root / "data")
    return root, paths


SFT_SMALL = ["batch_size=8", "data.max_prompt_len=16", "data.max_len=24", "run.progress=false"]
PPO_SMALL = ["batch_size=8", "mini_batch_size=4", "ppo_epochs=1", "max_new_tokens=4", "lora.r=4",
             "data.max_prompt_len=16", "run.progress=false"]


@pytest.fixture(scope="module")
def sft_dir(local):
    root, paths = local
    rc = _recipe("hydra_sft").main(["--model", str(root / "model"), "--sft", paths["sft"], "--pref", paths["pref"],
                                    "--out", str(root / "sft"), "--mode", "lora", "--epochs", "1", "lora.r=4",
                                    *SFT_SMALL])
    assert rc == 0
    return root / "sft" / "final"


def test_sft_recipe_writes_a_loadable_result(sft_dir, capsys):
    from hydra_kernels import rlhf
    assert (sft_dir / "reward_head.safetensors").is_file() and (sft_dir / "config.json").is_file()
    model, head = rlhf.load_sft(sft_dir)
    assert head.weight.shape == (1, 32)
    assert not hasattr(model, "hydra_patch")          # LoRA mode merged the adapter and unpatched the model


@pytest.mark.parametrize("reward", [None, "example"])
def test_ppo_recipe_with_head_or_user_reward(sft_dir, local, tmp_path, capsys, reward):
    _, paths = local
    args = ["--sft", str(sft_dir), "--prompts", paths["ppo"], "--out", str(tmp_path / "ppo"), "--steps", "2",
            *PPO_SMALL]
    if reward:
        args[:0] = ["--reward-fn", reward]
    assert _recipe("hydra_ppo").main(args) == 0
    rows = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert len(rows) == 2 and "objective/kl" in rows[0]
    if reward:
        # The user function drove PPO: -0.01 per character plus +-1 for EOS, never the head's scale.
        assert all(-1.2 < r["objective/scores"] < 1.0 for r in rows)
    merged = tmp_path / "ppo" / "merged"
    assert (merged / "config.json").is_file()
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(merged), local_files_only=True)
    out = capsys.readouterr().out
    assert "SFT:" in out and "PPO:" in out


def test_ppo_recipe_reward_fn_from_a_file(sft_dir, local, tmp_path):
    _, paths = local
    (tmp_path / "mine.py").write_text("def reward(prompts, completions, ended):\n    return [0.5] * len(prompts)\n")
    assert _recipe("hydra_ppo").main(["--sft", str(sft_dir), "--prompts", paths["ppo"], "--out",
                                      str(tmp_path / "ppo"), "--steps", "1", "--reward-fn",
                                      f"{tmp_path / 'mine.py'}:reward", *PPO_SMALL]) == 0
    row = json.loads(open(tmp_path / "ppo" / "metrics.jsonl").readline())
    assert row["objective/scores"] == pytest.approx(0.5)


# --- run as a subprocess, with --config ---

def recipe(name, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "python" / f"{name}.py"), *map(str, args)], cwd=cwd,
                          env=env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def local_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_recipes")
    return root, make_local(root)


def test_sft_recipe_takes_paths_and_output_dir_from_config(local_dirs, tmp_path):
    _, paths = local_dirs
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"epochs: 1\nbatch_size: 4\ndata: {{sft_path: {paths['demos']}, preference_path: {paths['pairs']}, "
                   f"max_prompt_len: 16, max_len: 24}}\nrun: {{output_dir: {tmp_path / 'mine'}, progress: false}}\n")
    proc = recipe("hydra_sft", "--model", paths["model"], "--config", cfg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the JSON comes last; libraries may log before it (deepspeed's logger writes to stdout when installed)
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["output_dir"] == str(tmp_path / "mine" / "final")
    assert (tmp_path / "mine" / "final" / "sft.json").is_file()
    assert not (tmp_path / "runs").exists()


def test_ppo_recipe_takes_output_dir_and_dtype_from_config(local_dirs, tmp_path):
    _, paths = local_dirs
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text("steps: 1\nbatch_size: 2\nmini_batch_size: 2\nppo_epochs: 1\nmax_new_tokens: 3\nlora: {r: 2}\n"
                   f"model: {{dtype: bfloat16}}\nrun: {{output_dir: {tmp_path / 'mine'}, progress: false}}\n")
    proc = recipe("hydra_ppo", "--sft", paths["sft"], "--prompts", paths["prompts"], "--config", cfg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert info["output_dir"] == str(tmp_path / "mine")
    assert info["merged_policy"] == str(tmp_path / "mine" / "merged")
    assert not (tmp_path / "runs").exists()
    merged = json.loads((tmp_path / "mine" / "merged" / "config.json").read_text())
    assert merged["dtype"] == "bfloat16"                  # the policy trained in the dtype asked for


@pytest.mark.parametrize("name, args, needle", [
    ("hydra_sft", ["--sft", "{demos}", "lr=abc"], "lr"),
    ("hydra_sft", ["--sft", "{root}/missing.jsonl"], "missing.jsonl"),
    ("hydra_ppo", ["--sft", "{sft}", "--prompts", "{prompts}", "--reward-fn", "{root}/missing.py:reward"],
     "missing.py"),
    ("hydra_ppo", ["--sft", "{model}", "--prompts", "{prompts}"], "Hydra-SFT"),
])
def test_recipe_errors_are_one_line(local_dirs, tmp_path, name, args, needle):
    root, paths = local_dirs
    fmt = {k: str(v) for k, v in paths.items()} | {"root": str(root)}
    if name == "hydra_sft":
        args = ["--model", str(paths["model"]), *args]
    proc = recipe(name, *(a.format(**fmt) for a in args), "run.progress=false", cwd=tmp_path)
    assert_one_line_error(proc, needle)
