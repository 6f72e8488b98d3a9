"""`hydra-rlhf sft` then `hydra-rlhf ppo` without run.output_dir, and ppo pointed at an SFT run's output_dir.

The defaults differ (runs/hydra-sft, runs/hydra-ppo, as the python/ recipes), so a newcomer who sets only the
model and data paths never runs PPO over the SFT result it reads; and a stage refuses up front, before writing
anything, an output_dir whose final/ is another stage's result.
"""
import hashlib
import json

from tests.cli._local import PPO_SMALL, SFT_SMALL, assert_one_line_error, cli, make_local


def _digest(*files):
    return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def test_sft_then_ppo_with_default_output_dirs(tmp_path):
    paths = make_local(tmp_path / "in")
    work = tmp_path / "work"
    work.mkdir()
    sft = cli("sft", f"model.path={paths['model']}", f"data.sft_path={paths['demos']}",
              f"data.preference_path={paths['pairs']}", *SFT_SMALL, cwd=work)
    assert sft.returncode == 0, sft.stderr[-3000:]
    sft_out = work / json.loads(sft.stdout)["output_dir"]           # <default output_dir>/final
    kept = _digest(sft_out.parent / "metrics.jsonl", sft_out / "model.safetensors", sft_out / "reward_head.safetensors")
    checkpoints = sorted(p.name for p in (sft_out.parent / "checkpoints").iterdir())      # SFT's own

    # PPO told explicitly to write into the SFT run's directory: refused before anything is written.
    proc = cli("ppo", f"model.path={sft_out}", f"data.prompt_path={paths['prompts']}",
               f"run.output_dir={sft_out.parent}", *PPO_SMALL, cwd=work)
    assert_one_line_error(proc, "run.output_dir", "sft.json")
    assert sorted(p.name for p in (sft_out.parent / "checkpoints").iterdir()) == checkpoints

    # With the defaults, PPO has a directory of its own.
    ppo = cli("ppo", f"model.path={sft_out}", f"data.prompt_path={paths['prompts']}", *PPO_SMALL, cwd=work)
    assert ppo.returncode == 0, ppo.stderr[-3000:]
    assert (work / json.loads(ppo.stdout)["output_dir"]).resolve() != sft_out.parent.resolve()
    assert _digest(sft_out.parent / "metrics.jsonl", sft_out / "model.safetensors",
                   sft_out / "reward_head.safetensors") == kept

    # And SFT refuses a PPO run's directory the same way.
    proc = cli("sft", f"model.path={paths['model']}", f"data.sft_path={paths['demos']}",
               f"run.output_dir={work / json.loads(ppo.stdout)['output_dir']}", *SFT_SMALL, cwd=work)
    assert_one_line_error(proc, "run.output_dir", "policy.json")
