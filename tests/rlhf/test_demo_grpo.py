"""`hydra-rlhf demo --algo grpo --quick`: Hydra-SFT then critic-free RL on the gold reward, end to end (CI-sized:
the plumbing, not the quality; the full run's numbers are measured by hand)."""
import json
import math

import pytest

from hydra_kernels.cli import main
from hydra_kernels.rlhf.demo import plot
from hydra_kernels.rlhf.demo.run import DemoConfig, apply_demo_overrides, default_config, quick_config

GRPO_NAMES = ("reward", "reward_std", "frac_reward_zero_std", "entropy", "clip_ratio/region_mean",
              "completions/mean_length", "rewards/gold/mean")


def test_quick_grpo_demo(tmp_path):
    assert main(["demo", "--quick", "--algo", "grpo", "--out", str(tmp_path), "--seed", "2", "--no-progress"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "grpo" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert all(k in r for k in GRPO_NAMES), [k for k in GRPO_NAMES if k not in r]
        # The gold reward is the verifiable reward: what the step trained on is what it logs as gold.
        assert r["reward"] == pytest.approx(r["rewards/gold/mean"])
    assert (tmp_path / "grpo" / "final" / "policy.json").is_file() and not (tmp_path / "ppo").exists()
    img = plot.read_png(tmp_path / "grpo_curves.png")
    assert img.ndim == 3 and img.shape[1] == 900
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["algo"] == "grpo"
    for key in ("gold_reward_sft", "gold_reward_grpo", "gold_reward_diff", "gold_reward_diff_se", "kl_grpo_vs_sft"):
        assert isinstance(s[key], float) and math.isfinite(s[key]), key
    assert s["config"]["grpo"]["estimator"] == "grpo"


def test_grpo_demo_configs():
    full = default_config("grpo")
    assert full.algo == "grpo" and full.sft.reward_coef == 0.0 and full.grpo.num_generations == 8
    assert full.grpo.batch_size % full.grpo.num_generations == 0
    assert default_config("ppo") == DemoConfig()
    assert quick_config("grpo").grpo.steps < full.grpo.steps
    cfg = apply_demo_overrides(full, ["grpo.estimator=dapo", "grpo.steps=5"])
    assert cfg.grpo.estimator == "dapo" and cfg.grpo.steps == 5
    with pytest.raises(ValueError, match="grpo.*num_generations"):
        apply_demo_overrides(full, ["grpo.batch_size=100"])
    with pytest.raises(ValueError, match="algo"):
        DemoConfig(algo="sac")
