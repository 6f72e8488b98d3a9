"""`hydra-rlhf grpo` as a user runs it (python -m hydra_kernels.cli): from a Hydra-SFT output or a plain causal LM,
with reward functions (repeatable --reward-fn, reward_weights), a reward model or the SFT reward head; its errors;
`--help`; and `hydra-rlhf ppo` with several weighted reward functions."""
import json

import pytest

from hydra_kernels.cli import main
from hydra_kernels.rlhf.config import GRPOConfig, settings
from tests.cli._local import PPO_SMALL, assert_one_line_error, cli, make_local, write_jsonl

GRPO_SMALL = ["steps=2", "batch_size=4", "num_generations=2", "max_new_tokens=3", "lora.r=2",
              "data.max_prompt_len=16", "run.progress=false"]
REWARDS = '''def digits(prompts, completions, ended):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def matches(completions, answer, **kwargs):
    return [float(c == a) for c, a in zip(completions, answer)]


def buggy(prompts, completions, **kwargs):
    raise ValueError("a bug in my reward")
'''


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_grpo")
    paths = make_local(root)
    (root / "rewards.py").write_text(REWARDS)
    paths["rows"] = write_jsonl(root / "rows.jsonl", [{"prompt": f"{a}+2=", "answer": str(a + 2)}
                                                      for a in range(10, 18)])
    return root, paths


def _grpo(paths, out, *extra, model="sft", prompts="prompts"):
    return cli("grpo", f"model.path={paths[model]}", f"data.prompt_path={paths[prompts]}", f"run.output_dir={out}",
               *GRPO_SMALL, *extra)


def _rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


def test_grpo_from_a_hydra_sft_output_with_weighted_functions_and_dataset_columns(local, tmp_path):
    root, paths = local
    out = tmp_path / "run"
    proc = _grpo(paths, out, "estimator=dapo", "overlong_buffer=0", "mask_truncated=false", "--reward-fn",
                 f"{root / 'rewards.py'}:digits", "--reward-fn", f"{root / 'rewards.py'}:matches",
                 "reward_weights=[1.0,2.0]", "--merge-to", tmp_path / "merged",
                 prompts="rows")
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert info["steps"] == 2 and info["output_dir"] == str(out)
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["reward"] == pytest.approx(r["rewards/digits/mean"] + 2.0 * r["rewards/matches/mean"])
        assert {"frac_reward_zero_std", "clip_ratio/high_mean", "completions/clipped_ratio"} <= set(r)
    meta = json.loads((out / "final" / "policy.json").read_text())
    assert meta["variant"] == "critic-free" and meta["config"]["estimator"] == "dapo"
    assert (tmp_path / "merged" / "config.json").is_file()


def test_grpo_from_a_plain_causal_lm(local, tmp_path):
    root, paths = local
    proc = _grpo(paths, tmp_path / "run", "--reward-fn", f"{root / 'rewards.py'}:digits", "beta=0.1", model="model")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _rows(tmp_path / "run")[0]["kl"] == 0.0


def test_grpo_with_the_sft_reward_head_when_no_function_is_given(local, tmp_path):
    _, paths = local
    proc = _grpo(paths, tmp_path / "run", "estimator=rloo")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rewards/reward_head/mean" in _rows(tmp_path / "run")[0]


@pytest.mark.parametrize("extra, needles", [
    (["batch_size=5"], ["batch_size", "num_generations (2)"]),
    (["estimator=nope"], ["estimator", "grpo"]),
    (["reward_source=head", "--reward-fn", "{root}/rewards.py:digits"], ["reward_source", "--reward-fn"]),
    (["reward_weights=[1,2]", "--reward-fn", "{root}/rewards.py:digits"], ["reward_weights", "2 weights for 1"]),
    (["--reward-fn", "{root}/rewards.py:nope"], ["--reward-fn", "nope"]),
])
def test_grpo_errors_are_one_line_before_any_work(local, tmp_path, extra, needles):
    root, paths = local
    proc = _grpo(paths, tmp_path / "run", *[e.format(root=root) for e in extra])
    assert_one_line_error(proc, *needles)
    assert not (tmp_path / "run").exists()


def test_an_error_inside_the_reward_function_shows_its_traceback(local, tmp_path):
    """Not a one-line settings error: the user's own code failed, with its own traceback."""
    root, paths = local
    proc = _grpo(paths, tmp_path / "run", "--reward-fn", f"{root / 'rewards.py'}:buggy", "steps=1")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "a bug in my reward" in proc.stderr
    assert "rewards.py" in proc.stderr and "raised inside the reward function buggy" in proc.stderr


def test_grpo_from_a_plain_model_without_a_reward_is_refused(local, tmp_path):
    _, paths = local
    proc = _grpo(paths, tmp_path / "run", model="model")
    assert_one_line_error(proc, "reward_fn", "--reward-fn", "reward_model")


def test_grpo_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit) as e:
        main(["grpo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flat = " ".join(out.split())
    for name, accepted, default, help_ in settings(GRPOConfig):
        assert f"{name}={default} {accepted} {' '.join(help_.split())}" in flat, name
    assert "estimator=grpo grpo | dr_grpo | dapo | rloo | reinforce_pp | reinforce_pp_baseline" in flat
    assert "run.output_dir=runs/hydra-grpo" in flat


def test_a_dashed_grpo_setting_suggests_key_value(capsys):
    with pytest.raises(SystemExit):
        main(["grpo", "--num-generations", "4"])
    assert "did you mean num_generations=4" in capsys.readouterr().err


def test_ppo_with_two_weighted_reward_functions(local, tmp_path):
    root, paths = local
    out = tmp_path / "ppo"
    proc = cli("ppo", f"model.path={paths['sft']}", f"data.prompt_path={paths['prompts']}", f"run.output_dir={out}",
               *PPO_SMALL, "--reward-fn", f"{root / 'rewards.py'}:digits", "--reward-fn",
               f"{root / 'rewards.py'}:digits", "reward_weights=[1,0.5]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = _rows(out)[0]
    assert r["objective/scores"] == pytest.approx(1.5 * r["rewards/digits_0/mean"])
    proc = cli("ppo", f"model.path={paths['sft']}", f"data.prompt_path={paths['prompts']}",
               f"run.output_dir={tmp_path / 'x'}", *PPO_SMALL, "reward_weights=[1,0.5]")
    assert_one_line_error(proc, "reward_weights")


def test_grpo_recipe(local, tmp_path):
    """python/hydra_grpo.py as a user runs it: a plain causal LM, the example reward, the merged policy."""
    import subprocess
    import sys

    from tests.cli._local import ROOT, env
    _, paths = local
    proc = subprocess.run([sys.executable, str(ROOT / "python" / "hydra_grpo.py"), "--model", str(paths["model"]),
                           "--prompts", str(paths["rows"]), "--out", str(tmp_path / "out"), "--estimator", "dr_grpo",
                           "--reward-fn", "example", *GRPO_SMALL], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout[proc.stdout.index("{\n"):])
    assert info["steps"] == 2 and (tmp_path / "out" / "merged" / "config.json").is_file()
    assert "before:" in proc.stdout and "after:" in proc.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "python" / "hydra_grpo.py"), "--model", str(paths["model"]),
                          "--prompts", str(paths["rows"]), "--out", str(tmp_path / "bad"), "batch_size=3",
                          *GRPO_SMALL[2:]], cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert_one_line_error(bad, "batch_size", "num_generations")
