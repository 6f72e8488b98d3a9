"""`hydra-rlhf ppo` on a plain causal LM with --reward-fn (no Hydra-SFT), its sample completions, --version,
--no-progress on every command with progress bars, and the "resuming from step N" notice."""
import json

import pytest

from hydra_kernels.cli import main
from tests.cli._local import PPO_SMALL, SFT_SMALL, assert_one_line_error, cli, make_local

# TRL's signature (prompts, completions, **kwargs) and the older (prompts, completions, ended) both fit.
REWARD = "def reward(prompts, completions, *args, **kwargs):\n    return [float(len(c)) for c in completions]\n"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_plain_ppo")
    paths = make_local(root)
    (root / "mine.py").write_text(REWARD)
    return root, paths


def _ppo(paths, model, out, *extra):
    return cli("ppo", f"model.path={model}", f"data.prompt_path={paths['prompts']}", f"run.output_dir={out}",
               *PPO_SMALL, *extra)


def test_ppo_from_a_plain_model_with_a_reward_function(local, tmp_path):
    from transformers import AutoModelForCausalLM
    root, paths = local
    proc = _ppo(paths, paths["model"], tmp_path / "ppo", "--reward-fn", f"{root / 'mine.py'}:reward",
                "--samples", "2", "--merge-to", tmp_path / "policy", "steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "the value head starts from a fresh head" in proc.stderr
    info = json.loads(proc.stdout)
    assert info["steps"] == 2 and info["merged_policy"] == str(tmp_path / "policy")
    assert [s["prompt"] for s in info["samples"]] == ["10+2=", "11+2="]
    assert all(isinstance(s["reference"], str) and isinstance(s["policy"], str) for s in info["samples"])
    assert "sample completions (greedy, the first 2 prompts)" in proc.stderr
    rows = [json.loads(line) for line in open(tmp_path / "ppo" / "metrics.jsonl")]
    assert len(rows) == 2 and all("objective/reward_head" not in r for r in rows)     # a fresh head's scores
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"), local_files_only=True)


def test_a_plain_model_without_a_reward_function_is_refused(local, tmp_path):
    _, paths = local
    line = assert_one_line_error(_ppo(paths, paths["model"], tmp_path / "ppo"), "model.path:",
                                 "is not a Hydra-SFT output", "--reward-fn")
    assert "reward_source=head" in line and not (tmp_path / "ppo").exists()


def test_samples_zero_prints_none_and_a_negative_count_is_refused(local, tmp_path):
    _, paths = local
    proc = _ppo(paths, paths["sft"], tmp_path / "ppo", "--samples", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples" not in json.loads(proc.stdout) and "sample completions" not in proc.stderr
    assert_one_line_error(_ppo(paths, paths["sft"], tmp_path / "ppo2", "--samples", "-1"), "--samples")


def test_version(capsys):
    import hydra_kernels
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"hydra-rlhf {hydra_kernels.__version__}"


@pytest.mark.parametrize("command", ["demo", "sft", "ppo"])
def test_every_command_with_progress_bars_takes_no_progress_and_lists_its_settings(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "--no-progress" in out and "settings (key=value; shown with their defaults" in out


def test_no_progress_turns_the_bars_off_and_a_resumed_run_says_where_it_resumes(local, tmp_path, monkeypatch,
                                                                                capsys):
    import tqdm.auto
    _, paths = local
    bars = []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *a, **k):
            bars.append(k.get("desc"))
            super().__init__(*a, **k)
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    args = ["sft", f"model.path={paths['model']}", f"data.sft_path={paths['demos']}",
            *[a for a in SFT_SMALL if a != "run.progress=false"]]
    assert main([*args, f"run.output_dir={tmp_path / 'sft1'}", "--no-progress"]) == 0
    assert not [b for b in bars if b and b.startswith("Hydra-SFT")]
    assert main([*args, f"run.output_dir={tmp_path / 'sft2'}"]) == 0          # a bar by default
    assert [b for b in bars if b and b.startswith("Hydra-SFT")]

    ppo = ["ppo", f"model.path={paths['sft']}", f"data.prompt_path={paths['prompts']}",
           f"run.output_dir={tmp_path / 'ppo'}", *PPO_SMALL, "--samples", "0"]
    assert main(ppo) == 0
    capsys.readouterr()
    assert main([*ppo, "steps=2", "--no-progress"]) == 0     # one more step: resumes after step 1
    assert capsys.readouterr().err.count("resuming from step 1 (") == 1
