"""key=value overrides on both sides of an option (`... run.output_dir=x --merge-to y steps=2`).

Overrides after an option are applied as the documented syntax says, in the CLI and in the python/ recipes
(`--model m lr=1e-3 --epochs 1 lora.r=4`), never "unrecognized arguments".
"""
import json
import subprocess
import sys

from tests.cli._local import PPO_SMALL, ROOT, assert_one_line_error, cli, env, make_local


def test_overrides_after_an_option_are_read(tmp_path):
    paths = make_local(tmp_path)
    proc = cli("ppo", f"model.path={paths['sft']}", "--merge-to", tmp_path / "policy", *PPO_SMALL, "steps=2",
               "--reward-fn", "no_such_module_xyz:reward", f"data.prompt_path={paths['prompts']}",
               f"run.output_dir={tmp_path / 'ppo'}")
    assert_one_line_error(proc, "--reward-fn", "no_such_module_xyz")     # parsed through to the reward function
    proc = cli("ppo", f"model.path={paths['sft']}", "--merge-to", tmp_path / "policy", *PPO_SMALL, "steps=2",
               f"data.prompt_path={paths['prompts']}", f"run.output_dir={tmp_path / 'ppo'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["steps"] == 2 and (tmp_path / "policy" / "config.json").is_file()


def test_unknown_options_are_still_refused(tmp_path):
    proc = cli("sft", "model.path=x", "--merge-to", "y")
    assert proc.returncode == 2 and "unrecognized arguments: --merge-to" in proc.stderr


def test_recipe_overrides_after_an_option_are_read(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "hydra_sft.py"), "--model", str(tmp_path / "m"),
                           "lora.r=4", "--epochs", "1", "lr=abc", "--sft", "x.jsonl"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=120)
    assert_one_line_error(proc, "lr:")
