"""`hydra-rlhf sft` then `hydra-rlhf ppo` in-process on a tiny local model; errors name the setting."""
import json
from pathlib import Path

import pytest

from hydra_kernels.cli import main as cli_main
from tests.cli._local import make_local

SFT_SMALL = ["batch_size=8", "data.max_prompt_len=16", "data.max_len=24", "run.progress=false"]
PPO_SMALL = ["batch_size=8", "mini_batch_size=4", "ppo_epochs=1", "max_new_tokens=4", "lora.r=4",
             "data.max_prompt_len=16", "run.progress=false"]


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft_then_ppo")
    return root, make_local(root)


def test_cli_sft_then_ppo(local, tmp_path, capsys):
    _, paths = local
    assert cli_main(["sft", f"model.path={paths['model']}", f"data.sft_path={paths['demos']}",
                     f"data.preference_path={paths['pairs']}", f"run.output_dir={tmp_path / 'sft'}", "epochs=1",
                     *SFT_SMALL]) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info["output_dir"]).name == "final" and "eval/reward_accuracy" in info
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(f"variant: j-hydra\nsteps: 2\nmodel: {{path: {tmp_path / 'sft' / 'final'}}}\n"
                   f"data: {{prompt_path: {paths['prompts']}}}\nrun: {{output_dir: {tmp_path / 'ppo'}}}\n")
    assert cli_main(["ppo", "--config", str(cfg), "--merge-to", str(tmp_path / "merged"), *PPO_SMALL]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["steps"] == 2 and (tmp_path / "merged" / "config.json").is_file()


def test_cli_errors_name_the_setting(local, tmp_path, capsys):
    _, paths = local
    assert cli_main(["sft", f"data.sft_path={paths['demos']}"]) == 2
    assert "model.path" in capsys.readouterr().err
    assert cli_main(["ppo", f"model.path={tmp_path}", "data.prompt_path=/nonexistent.jsonl"]) == 2
    assert "nonexistent" in capsys.readouterr().err
    assert cli_main(["sft", f"model.path={paths['model']}", f"data.sft_path={paths['demos']}", "epochs=0"]) == 2
    assert "epochs" in capsys.readouterr().err
