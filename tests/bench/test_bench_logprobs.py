"""bench/bench_logprobs.py: the from-logits target (issue 4) and the result files rewritten as rows come in."""
import json

import pytest
import torch

from tests.bench._load import load_bench

GIB = 1 << 30


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_logprobs")


def test_logits_target_is_85_percent_of_hbm_on_cases_of_a_gib_or_more(bench):
    rows = [dict(case="fwd models=1 N=16384 V=151936", impl="ours", ms=1.0, bytes=4 * GIB),
            dict(case="fwd models=1 N=16384 V=151936", impl="cuda", ms=1.0, bytes=4 * GIB),
            dict(case="fwd models=1 N=16384 V=151936", impl="eager", ms=2.0, bytes=4 * GIB),
            dict(case="fwd models=1 N=64 V=1000", impl="ours", ms=0.01, bytes=128_000)]
    env = {"hbm_gbps": 4 * GIB / 1e-3 / 1e9 / 0.9}         # ours and cuda move 90% of it
    rows[1]["ms"] = 0.9 / 0.8                                 # cuda: 80%
    bench.derive(rows, env)
    got = bench.logits_targets(rows, env)
    assert [(t["id"], t["ok"]) for t in got] == [("logprobs.ours_hbm", True), ("logprobs.cuda_hbm", False)]
    assert got[0]["value"] == pytest.approx(0.9) and got[1]["value"] == pytest.approx(0.8)
    assert all(t["issue"] == "issue 4" and t["where"] == rows[0]["case"] for t in got)


def test_results_are_rewritten_as_rows_come_in(bench, tmp_path, monkeypatch):
    """A run stopped mid-section leaves a complete=false JSON with the rows measured so far (one file pair)."""
    calls = []

    def section(args, env):
        rows = []
        for i in range(3):
            rows.append(dict(case=f"c{i}", impl="ours", ms=1.0 + i))
            bench.progress(env, rows)
            calls.append(json.loads(next(tmp_path.glob("*.json")).read_text()))
        return rows
    monkeypatch.setitem(bench.SECTIONS, "logits", section)
    assert bench.main(["--smoke", "--section", "logits", "--out", str(tmp_path)]) == 0
    assert [len(c["results"]) for c in calls] == [1, 2, 3] and not any(c["complete"] for c in calls)
    (js,) = tmp_path.glob("*.json")
    assert len(list(tmp_path.glob("*.md"))) == 1 and not list(tmp_path.glob("*.tmp"))
    final = json.loads(js.read_text())
    assert final["complete"] is True and [r["case"] for r in final["results"]] == ["c0", "c1", "c2"]
    assert final["targets"] == [] and torch.device(final["device_type"]).type == "cpu"
