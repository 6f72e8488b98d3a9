"""python/hydra_sft.py and python/hydra_ppo.py with --config, run as a user runs them (a subprocess).

Before: both recipes said "flags and key=value win over" --config, but --out had a default, so the config's
run.output_dir was always replaced by runs/hydra-sft (runs/hydra-ppo) under the current directory; hydra_sft.py
ignored the config's data paths ("give --sft and/or --pref"); hydra_ppo.py loaded the SFT model in float32
whatever model.dtype said (and ignored model.tokenizer_path); bad settings and reward functions gave tracebacks.
"""
import json
import subprocess
import sys

import pytest

from tests.cli._local import ROOT, assert_one_line_error, env, make_local


def recipe(name, *args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "python" / f"{name}.py"), *map(str, args)], cwd=cwd,
                          env=env(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_recipes")
    return root, make_local(root)


def test_sft_recipe_takes_paths_and_output_dir_from_config(local, tmp_path):
    _, paths = local
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"epochs: 1\nbatch_size: 4\ndata: {{sft_path: {paths['demos']}, preference_path: {paths['pairs']}, "
                   f"max_prompt_len: 16, max_len: 24}}\nrun: {{output_dir: {tmp_path / 'mine'}, progress: false}}\n")
    proc = recipe("hydra_sft", "--model", paths["model"], "--config", cfg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["output_dir"] == str(tmp_path / "mine" / "final")
    assert (tmp_path / "mine" / "final" / "sft.json").is_file()
    assert not (tmp_path / "runs").exists()


def test_ppo_recipe_takes_output_dir_and_dtype_from_config(local, tmp_path):
    _, paths = local
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
def test_recipe_errors_are_one_line(local, tmp_path, name, args, needle):
    root, paths = local
    fmt = {k: str(v) for k, v in paths.items()} | {"root": str(root)}
    if name == "hydra_sft":
        args = ["--model", str(paths["model"]), *args]
    proc = recipe(name, *(a.format(**fmt) for a in args), "run.progress=false", cwd=tmp_path)
    assert_one_line_error(proc, needle)
