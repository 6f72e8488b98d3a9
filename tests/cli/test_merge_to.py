"""`hydra-rlhf ppo --merge-to DIR` (HydraModel.merge) and rlhf.save_sft / save_policy into an existing directory.

These writers build the result next to DIR and then swap it in, deleting what DIR held. An existing directory
is replaced only when this library wrote it as a result of the same kind (its marker file) and it holds nothing
else: a parent such as runs/, a data directory, the SFT result or the user's own pretrained model is refused
naming the argument, and the CLI refuses before training.
"""
import json

import pytest

from hydra_kernels import rlhf
from tests.cli._local import PPO_SMALL, assert_one_line_error, cli, make_local


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_merge_to")
    return root, make_local(root)


def _ppo(paths, out, merge_to):
    return cli("ppo", f"model.path={paths['sft']}", f"data.prompt_path={paths['prompts']}", f"run.output_dir={out}",
               *PPO_SMALL, "--merge-to", merge_to)


def test_merge_to_a_parent_directory_is_refused_before_training(local, tmp_path):
    _, paths = local
    runs = tmp_path / "runs"
    (runs / "old_run").mkdir(parents=True)
    (runs / "notes.txt").write_text("precious")
    proc = _ppo(paths, runs / "ppo", runs)
    assert_one_line_error(proc, "--merge-to", str(runs))
    assert (runs / "notes.txt").read_text() == "precious" and (runs / "old_run").is_dir()
    assert not (runs / "ppo").exists()


@pytest.mark.parametrize("what", ["data", "sft"])
def test_merge_to_a_directory_of_other_files_is_refused(local, tmp_path, what):
    _, paths = local
    target = paths["sft"] if what == "sft" else tmp_path / "data"
    if what == "data":
        target.mkdir()
        (target / "train.jsonl").write_text('{"prompt": "1+1="}\n')
    before = sorted(p.name for p in target.iterdir())
    proc = _ppo(paths, tmp_path / "ppo", target)
    assert_one_line_error(proc, "--merge-to", str(target))
    assert sorted(p.name for p in target.iterdir()) == before


def test_merge_to_the_users_pretrained_model_is_refused_and_its_weights_kept(local, tmp_path):
    _, paths = local
    model_dir = paths["model"]                    # written by transformers' save_pretrained, not by hydra_kernels
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    proc = _ppo(paths, tmp_path / "ppo", model_dir)
    assert_one_line_error(proc, "--merge-to", str(model_dir), "was not written by hydra_kernels")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before
    assert not (tmp_path / "ppo").exists()


def test_merge_to_an_earlier_merged_policy_replaces_it(local, tmp_path):
    _, paths = local
    for out in ("ppo1", "ppo2"):                                  # the second run replaces the first's policy
        proc = _ppo(paths, tmp_path / out, tmp_path / "policy")
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert json.loads(proc.stdout)["merged_policy"] == str(tmp_path / "policy")
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"), local_files_only=True)


def test_save_sft_and_save_policy_refuse_a_directory_that_is_not_theirs(local, tmp_path):
    _, paths = local
    model, head = rlhf.load_sft(paths["sft"])
    result = rlhf.SFTResult(model, head)
    runs = tmp_path / "runs"
    (runs / "ppo").mkdir(parents=True)
    with pytest.raises(ValueError, match="out_dir: .*runs"):
        rlhf.save_sft(runs, result)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    with pytest.raises(ValueError, match="out_dir: .*notes"):
        rlhf.save_sft(tmp_path / "notes", result)
    assert (runs / "ppo").is_dir() and (tmp_path / "notes" / "todo.txt").read_text() == "x"
    rlhf.save_sft(tmp_path / "sft", result)
    rlhf.save_sft(tmp_path / "sft", result)                       # its own earlier result: replaced
    assert (tmp_path / "sft" / "sft.json").is_file()
