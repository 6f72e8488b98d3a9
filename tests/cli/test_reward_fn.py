"""Reward functions from a spec: hydra_kernels.rlhf.rewards.load_reward_fn in process, and `hydra-rlhf ppo
--reward-fn` / `--merge-to` run as a user runs them (python -m hydra_kernels.cli).
"""
import json
import sys

import pytest

from hydra_kernels.rlhf.rewards import load_reward_fn
from tests.cli._local import PPO_SMALL, assert_one_line_error, cli, make_local

REWARD = "def reward(prompts, completions, ended):\n    return [0.5] * len(prompts)\n"


def test_load_reward_fn_from_a_file_and_a_module(tmp_path, monkeypatch):
    (tmp_path / "mine.py").write_text(REWARD)
    (tmp_path / "pkg_rewards").mkdir()
    (tmp_path / "pkg_rewards" / "__init__.py").write_text("")
    (tmp_path / "pkg_rewards" / "mod.py").write_text(REWARD)
    fn = load_reward_fn(f"{tmp_path / 'mine.py'}:reward")
    assert fn(["p", "q"], ["a", "b"], [True, False]) == [0.5, 0.5]
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "pkg_rewards", raising=False)
    monkeypatch.delitem(sys.modules, "pkg_rewards.mod", raising=False)
    assert load_reward_fn("pkg_rewards.mod:reward")(["p"], ["a"], [True]) == [0.5]


@pytest.mark.parametrize("spec, needle", [("no_colon", "module:function"), ("{tmp}/missing.py:reward", "missing.py"),
                                          ("no_such_module_xyz:reward", "no_such_module_xyz"),
                                          ("{tmp}/mine.py:rewrd", "rewrd"), ("{tmp}/mine.py:VALUE", "VALUE")])
def test_load_reward_fn_errors_name_the_argument(tmp_path, spec, needle):
    (tmp_path / "mine.py").write_text(REWARD + "VALUE = 3\n")
    for kwargs, name in (({}, "spec"), ({"name": "--reward-fn"}, "--reward-fn")):
        with pytest.raises(ValueError, match=f"^{name}: .*{needle}"):
            load_reward_fn(spec.format(tmp=tmp_path), **kwargs)


def test_load_reward_fn_keeps_the_error_of_a_broken_user_module(tmp_path, monkeypatch):
    """The module is found but imports something missing: that is the user's bug, reported as it is."""
    (tmp_path / "broken_reward_mod.py").write_text("import no_such_dependency_xyz\n" + REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        load_reward_fn("broken_reward_mod:reward")


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
    """--reward-fn without reward_source=function: the user's function drives PPO."""
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


def test_merge_to_with_the_lora_variant_writes_the_merged_actor(local, tmp_path):
    """Every variant exports its policy (the 4-model lora variant: the actor copy with its adapter merged)."""
    from transformers import AutoModelForCausalLM
    _, paths = local
    proc = _ppo(paths, tmp_path / "ppo", "variant=lora", "--merge-to", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["merged_policy"] == str(tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), local_files_only=True)
    assert not any("lora" in k for k in model.state_dict())


def test_stdout_holds_only_the_result(local, tmp_path):
    """What runs inside the command (a chatty reward function here; deepspeed's logger when it is installed)
    prints to stderr: stdout is the result's JSON alone."""
    (tmp_path / "chatty.py").write_text("def reward(prompts, completions, ended):\n"
                                        "    print('[WARNING] scoring', len(prompts), 'rows')\n"
                                        "    return [0.5] * len(prompts)\n")
    _, paths = local
    proc = _ppo(paths, tmp_path / "ppo", "--reward-fn", f"{tmp_path / 'chatty.py'}:reward")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["steps"] == 1
    assert "[WARNING] scoring" in proc.stderr
