"""`hydra-rlhf ppo --reward-fn` and `--merge-to`, run as a user runs them (python -m hydra_kernels.cli).

Found by walking the README's command line: the documented `module:function` form always crashed
(UnboundLocalError), a missing file or module gave a traceback, and a `--reward-fn` given without
`reward_source=function` was silently ignored (PPO trained on the reward head); `--merge-to` with a variant that
cannot merge was refused only after the whole run.
"""
import json

import pytest

from tests.cli._local import PPO_SMALL, assert_one_line_error, cli, make_local

REWARD = "def reward(prompts, completions, ended):\n    return [0.5] * len(prompts)\n"


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_reward")
    paths = make_local(root)
    (root / "user_rewards").mkdir()
    (root / "user_rewards" / "my_reward_mod.py").write_text(REWARD)
    (root / "mine.py").write_text(REWARD)
    return root, paths


def _ppo(paths, out, *extra, **kw):
    return cli("ppo", f"model.path={paths['sft']}", f"data.prompt_path={paths['prompts']}", f"run.output_dir={out}",
               *PPO_SMALL, *extra, **kw)


def _scores(out):
    return [json.loads(line)["objective/scores"] for line in open(out / "metrics.jsonl")]


def test_reward_fn_as_module_function(local, tmp_path):
    root, paths = local
    proc = _ppo(paths, tmp_path / "ppo", "reward_source=function", "--reward-fn", "my_reward_mod:reward",
                pythonpath=[str(root / "user_rewards")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _scores(tmp_path / "ppo") == [pytest.approx(0.5)]


def test_reward_fn_alone_selects_the_function(local, tmp_path):
    """--reward-fn without reward_source=function: the user's function drives PPO (it was silently ignored)."""
    root, paths = local
    proc = _ppo(paths, tmp_path / "ppo", "--reward-fn", f"{root / 'mine.py'}:reward")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _scores(tmp_path / "ppo") == [pytest.approx(0.5)]


def test_reward_fn_contradicting_reward_source_is_refused(local, tmp_path):
    root, paths = local
    proc = _ppo(paths, tmp_path / "ppo", "reward_source=head", "--reward-fn", f"{root / 'mine.py'}:reward")
    assert_one_line_error(proc, "reward_source", "--reward-fn")
    assert not (tmp_path / "ppo").exists()


@pytest.mark.parametrize("spec, needle", [("{root}/missing.py:reward", "missing.py"),
                                          ("no_such_module_xyz:reward", "no_such_module_xyz"),
                                          ("{root}/mine.py:rewrd", "rewrd")])
def test_reward_fn_that_cannot_be_loaded_is_one_line(local, tmp_path, spec, needle):
    root, paths = local
    proc = _ppo(paths, tmp_path / "ppo", "--reward-fn", spec.format(root=root))
    assert_one_line_error(proc, "--reward-fn", needle)
    assert not (tmp_path / "ppo").exists()


def test_merge_to_with_a_variant_that_cannot_merge_is_refused_before_training(local, tmp_path):
    _, paths = local
    proc = _ppo(paths, tmp_path / "ppo", "variant=lora", "--merge-to", tmp_path / "merged")
    assert_one_line_error(proc, "--merge-to", "lora")
    assert not (tmp_path / "ppo").exists()        # refused up front: nothing trained, nothing written
