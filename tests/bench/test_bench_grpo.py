"""bench/bench_grpo.py: the --quick CPU run measures every row (hydra and separate reference, mu1 and mu2) and writes
JSON + Markdown with an empty `targets` list (the issue states none); the separate-reference baseline computes the
same estimator; --budget skips the rows it has no time for; bench/run_gpu.sh's grpo slot finds the script."""
import json
import math
import os

import pytest

from tests.bench._load import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_grpo")


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo_bench")
    assert bench.main(["--cpu", "--quick", "--out", str(out), "--tag", "smoke"]) == 0
    js = [f for f in os.listdir(out) if f.endswith("_smoke.json")]
    md = [f for f in os.listdir(out) if f.endswith("_smoke.md")]
    assert len(js) == 1 and len(md) == 1
    return json.load(open(out / js[0])), open(out / md[0]).read()


def test_every_row_is_measured(bench, quick):
    result, md = quick
    assert result["targets"] == [] and result["meta"]["device_type"] == "cpu" and result["settings"]["quick"]
    rows = {(r["impl"], r["setting"]): r for r in result["rows"]}
    assert set(rows) == {(i, s) for i in bench.IMPLS for s in ("mu1", "mu2")}
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("error"), r.get("traceback"))
        last = r["last"]
        for name in ("time_score_s", "time_update_s", "time_step_s"):
            assert isinstance(last[name], float) and last[name] > 0 and math.isfinite(last[name]), (key, name)
        assert last["response_length"] == result["settings"]["response_len"]
        assert math.isfinite(r["time_step_s_vs_hydra"])
    assert rows[("hydra", "mu2")]["time_step_s_vs_hydra"] == 1.0
    assert "| separate | mu2 |" in md and "No numeric target" in md


def test_the_baseline_computes_the_same_estimator(quick):
    """Same rollout, same estimator: the first step's losses agree to fp32 rounding (fused head vs logits)."""
    result, _ = quick
    rows = {(r["impl"], r["setting"]): r for r in result["rows"]}
    for setting in ("mu1", "mu2"):
        a, b = (rows[(i, setting)]["steps"][0] for i in ("hydra", "separate"))
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-6)
        assert a["kl"] == pytest.approx(b["kl"], abs=1e-6)


def test_budget_skips_rows(bench, tmp_path):
    assert bench.main(["--cpu", "--quick", "--budget", "0", "--out", str(tmp_path)]) == 0
    result = json.load(open(next(tmp_path.glob("*.json"))))
    assert {r["status"] for r in result["rows"]} == {"skipped"}
