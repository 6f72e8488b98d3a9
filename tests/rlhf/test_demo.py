"""`hydra-rlhf demo --quick` end to end (the CI-sized run; the full-size quality claims are measured by hand)."""
import json
import math

import numpy as np
import pytest

from hydra_kernels.cli import main
from hydra_kernels.rlhf.demo import plot
from hydra_kernels.rlhf.demo.run import DemoConfig, apply_demo_overrides, quick_config
from hydra_kernels.rlhf.ppo import TRL_METRICS

TRL_NAMES = TRL_METRICS + ("time/rollout", "time/score", "time/update", "memory/peak")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc = main(["demo", "--quick", "--out", str(out), "--seed", "3", "--no-progress"])
    assert rc == 0
    return out


def test_quick_demo_writes_every_output(quick_run, capsys):
    out = quick_run
    for name in ("sft", "pref", "ppo", "eval_prompts", "eval_pairs"):
        assert (out / "data" / f"{name}.jsonl").is_file()
    assert (out / "base" / "config.json").is_file() and (out / "base" / "model.safetensors").is_file()
    assert (out / "sft" / "final" / "reward_head.safetensors").is_file()
    assert (out / "ppo" / "final" / "policy.safetensors").is_file()

    rows = [json.loads(line) for line in open(out / "ppo" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        missing = [k for k in TRL_NAMES + ("objective/gold_reward",) if k not in r]
        assert not missing, f"metrics.jsonl lacks {missing}"
        assert all(math.isfinite(r[k]) for k in TRL_NAMES)
    assert rows[0]["objective/kl"] == pytest.approx(0.0, abs=1e-6)      # step 0: the actor is the SFT policy

    img = plot.read_png(out / "ppo_curves.png")
    assert img.ndim == 3 and img.shape[1] == 900 and img.shape[0] > 700
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 3                # curves and text, not a blank image

    s = json.loads((out / "summary.json").read_text())
    for key in ("reward_accuracy", "gold_reward_sft", "gold_reward_sft_se", "gold_reward_ppo", "gold_reward_ppo_se",
                "gold_reward_diff", "gold_reward_diff_se", "kl_ppo_vs_sft", "exact_sft", "exact_ppo"):
        assert isinstance(s[key], float) and math.isfinite(s[key]), key
    assert 0.0 <= s["reward_accuracy"] <= 1.0 and s["kl_ppo_vs_sft"] >= -1e-6
    assert -1.0 <= s["gold_reward_sft"] <= 1.0 and -1.0 <= s["gold_reward_ppo"] <= 1.0
    assert s["timings_s"]["total"] > 0 and s["config"]["seed"] == 3


def test_quick_demo_is_deterministic(quick_run, tmp_path):
    """Same seed, same run: the PPO metrics (timings and memory aside) and the summary numbers repeat."""
    assert main(["demo", "--quick", "--out", str(tmp_path), "--seed", "3", "--no-progress"]) == 0

    def numbers(path):
        rows = [json.loads(line) for line in open(path / "ppo" / "metrics.jsonl")]
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "memory/")) and k != "eps"} for r in rows]

    assert numbers(tmp_path) == numbers(quick_run)
    a, b = (json.loads((p / "summary.json").read_text()) for p in (tmp_path, quick_run))
    for key in ("reward_accuracy", "gold_reward_sft", "gold_reward_ppo", "kl_ppo_vs_sft"):
        assert a[key] == b[key], key
    assert (tmp_path / "data" / "sft.jsonl").read_text() == (quick_run / "data" / "sft.jsonl").read_text()


def test_demo_overrides():
    cfg = apply_demo_overrides(DemoConfig(), ["task.n_sft=100", "model.hidden_size=32", "sft.lr=1e-3",
                                              "ppo.steps=7", "ppo.lora.r=4", "pretrain_steps=5", "seed=2"])
    assert cfg.task.n_sft == 100 and cfg.model.hidden_size == 32 and cfg.pretrain_steps == 5 and cfg.seed == 2
    assert cfg.sft.lr == 1e-3 and cfg.ppo.steps == 7 and cfg.ppo.lora.r == 4
    assert quick_config().ppo.steps < DemoConfig().ppo.steps
    with pytest.raises(ValueError, match="task.n_sfx"):
        apply_demo_overrides(DemoConfig(), ["task.n_sfx=1"])
    with pytest.raises(ValueError, match="model.hidden_size"):
        apply_demo_overrides(DemoConfig(), ["model.hidden_size=abc"])
    with pytest.raises(ValueError, match="ppo.*variant"):
        apply_demo_overrides(DemoConfig(), ["ppo.variant=nope"])
    with pytest.raises(ValueError, match="seed"):
        apply_demo_overrides(DemoConfig(), ["seed=-1"])
    # an optional field (`int | None`) takes an int or null
    assert apply_demo_overrides(DemoConfig(), ["threads=2"]).threads == 2
    assert apply_demo_overrides(DemoConfig(threads=2), ["threads=null"]).threads is None
    with pytest.raises(ValueError, match="threads"):
        apply_demo_overrides(DemoConfig(), ["threads=abc"])


def test_demo_cli_reports_bad_override(capsys):
    assert main(["demo", "--quick", "--no-progress", "task.demo_error_rate=2"]) == 2
    assert "demo_error_rate" in capsys.readouterr().err


def test_no_progress_silences_transformers_bars(tmp_path, capfd):
    from transformers.utils import logging as hf_logging

    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress", "pretrain_steps=0",
                 "ppo.steps=1"]) == 0
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err, err
    assert hf_logging.is_progress_bar_enabled()          # main() leaves the process-wide setting as it was
