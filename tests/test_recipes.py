"""Smoke tests: the python/ recipes and the `hydra-rlhf sft` / `ppo` commands on a tiny local model."""
import importlib.util
import json
from pathlib import Path

import pytest

from hydra_kernels.cli import main as cli_main
from hydra_kernels.rlhf.demo.model import TinyModelConfig, build_tiny_model, save_model
from hydra_kernels.rlhf.demo.task import ArithmeticTask, TaskConfig
from hydra_kernels.rlhf.demo.tokenizer import build_char_tokenizer

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


def test_cli_sft_then_ppo(local, tmp_path, capsys):
    root, paths = local
    assert cli_main(["sft", f"model.path={root / 'model'}", f"data.sft_path={paths['sft']}",
                     f"data.preference_path={paths['pref']}", f"run.output_dir={tmp_path / 'sft'}", "epochs=1",
                     *SFT_SMALL]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["output_dir"]).name == "final" and "eval/reward_accuracy" in info
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(f"variant: j-hydra\nsteps: 2\nmodel: {{path: {tmp_path / 'sft' / 'final'}}}\n"
                   f"data: {{prompt_path: {paths['ppo']}}}\nrun: {{output_dir: {tmp_path / 'ppo'}}}\n")
    assert cli_main(["ppo", "--config", str(cfg), "--merge-to", str(tmp_path / "merged"), *PPO_SMALL]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps"] == 2 and (tmp_path / "merged" / "config.json").is_file()


def test_cli_errors_name_the_setting(local, tmp_path, capsys):
    root, paths = local
    assert cli_main(["sft", f"data.sft_path={paths['sft']}"]) == 2
    assert "model.path" in capsys.readouterr().err
    assert cli_main(["ppo", f"model.path={tmp_path}", "data.prompt_path=/nonexistent.jsonl"]) == 2
    assert "nonexistent" in capsys.readouterr().err
    assert cli_main(["sft", f"model.path={root / 'model'}", f"data.sft_path={paths['sft']}", "epochs=0"]) == 2
    assert "epochs" in capsys.readouterr().err
