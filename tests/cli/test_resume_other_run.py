"""A run started in the run.output_dir of another run that left checkpoints there (python -m hydra_kernels.cli).

model.path and the data paths may change on resume (a moved directory is the same run), so before this a run
on ANOTHER model or other data "resumed" the old run's checkpoint without a word:
  * ppo on another SFT model with the same settings found the old run's final checkpoint, trained 0 steps,
    reported the old run's metrics as its own and `--merge-to` folded the old run's adapters into the new base;
  * sft on other data of the same size (or another base model) continued the old run's weights on the new
    data and wrote the mixture as final.
Now a checkpoint records digests of what its run started from (model and reward-head weights, data records)
and a run on other inputs is refused with one line naming the setting; moved inputs still resume.
"""
import hashlib
import shutil

import pytest

from tests.cli._local import (PPO_SMALL, SFT_SMALL, assert_one_line_error, cli, make_local, write_jsonl)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_resume_other")
    a = make_local(root / "a", seed=0)
    b = make_local(root / "b", seed=1)           # another model and SFT directory, same shapes and settings
    b["prompts"] = write_jsonl(root / "b" / "prompts.jsonl", [{"prompt": f"{x}+3="} for x in range(10, 18)])
    b["demos"] = write_jsonl(root / "b" / "sft.jsonl", [{"prompt": f"{x}+2=", "completion": str(x + 2)}
                                                        for x in range(10, 18)])
    return root, a, b


def _digest(*files):
    return [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]


def _ppo(sft, prompts, out, *extra):
    return cli("ppo", f"model.path={sft}", f"data.prompt_path={prompts}", f"run.output_dir={out}", *PPO_SMALL,
               *extra)


def test_ppo_in_the_output_dir_of_a_run_on_other_inputs(local, tmp_path):
    root, a, b = local
    out = tmp_path / "ppo"
    first = _ppo(a["sft"], a["prompts"], out)
    assert first.returncode == 0, first.stderr[-3000:]
    kept = _digest(out / "metrics.jsonl", out / "final" / "policy.safetensors")

    proc = _ppo(b["sft"], a["prompts"], out, "--merge-to", tmp_path / "merged")
    assert_one_line_error(proc, "run.output_dir", "model.path")
    assert not (tmp_path / "merged").exists()
    proc = _ppo(a["sft"], b["prompts"], out)
    assert_one_line_error(proc, "run.output_dir", "data.prompt_path")
    assert _digest(out / "metrics.jsonl", out / "final" / "policy.safetensors") == kept

    # The same inputs at other paths are the same run: it resumes (0 steps left) and finishes.
    shutil.copytree(a["sft"], tmp_path / "moved_sft")
    shutil.copy(a["prompts"], tmp_path / "moved.jsonl")
    proc = _ppo(tmp_path / "moved_sft", tmp_path / "moved.jsonl", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digest(out / "metrics.jsonl", out / "final" / "policy.safetensors") == kept


def test_sft_in_the_output_dir_of_a_run_on_other_inputs(local, tmp_path):
    root, a, b = local
    out = tmp_path / "sft"
    small = [s for s in SFT_SMALL if not s.startswith("epochs=")]
    # 8 demonstrations, batch 4: 2 steps per epoch, 2 epochs; checkpoints after steps 2 and 3 stay behind.
    args = ["epochs=2", "run.checkpoint_every=1", f"run.output_dir={out}", *small]
    first = cli("sft", f"model.path={a['model']}", f"data.sft_path={a['demos']}", *args)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoints" / "step-00000003").is_dir()
    kept = _digest(out / "metrics.jsonl", out / "final" / "model.safetensors")

    proc = cli("sft", f"model.path={a['model']}", f"data.sft_path={b['demos']}", *args)
    assert_one_line_error(proc, "run.output_dir", "data.sft_path")
    proc = cli("sft", f"model.path={b['model']}", f"data.sft_path={a['demos']}", *args)
    assert_one_line_error(proc, "run.output_dir", "model.path")
    assert _digest(out / "metrics.jsonl", out / "final" / "model.safetensors") == kept

    again = cli("sft", f"model.path={a['model']}", f"data.sft_path={a['demos']}", *args)   # the same run
    assert again.returncode == 0, again.stderr[-3000:]
    assert _digest(out / "final" / "model.safetensors") == kept[1:]
