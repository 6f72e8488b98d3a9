"""bench/bench_linear_logprobs.py (section `linear` of bench_logprobs): the CPU smoke mode runs end to end in
seconds and writes JSON + Markdown through the shared writer; target rows are derived from the results."""
import json
import os

import pytest

from tests.bench._load import ROOT, load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_linear_logprobs")


def test_smoke_writes_results(bench, tmp_path):
    if not os.path.exists(os.path.join(ROOT, "bench", "bench_logprobs.py")):
        pytest.skip("bench/bench_logprobs.py (the shared writer) is not in this checkout")
    assert bench.main(["--smoke", "--models", "2", "--out", str(tmp_path)]) == 0
    js = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    md = [f for f in os.listdir(tmp_path) if f.endswith(".md")]
    assert len(js) == 1 and len(md) == 1 and "linear" in js[0]
    result = json.load(open(tmp_path / js[0]))
    assert result["section"] == "linear" and result["date"] and result["versions"]["torch"]
    timed = [r for r in result["results"] if r.get("ms") is not None]
    assert {r["impl"] for r in timed} == {"ours", "materialized", "chunked"}
    assert {r["mode"] for r in timed} == {"fwd", "fwdbwd"}
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in timed)
    acc = [r for r in result["results"] if r["impl"] == "ours vs chunked"]
    assert acc and all(r["max_abs_err"] is not None and r["max_abs_err"] < 1e-4 for r in acc)
    assert "| case | impl | median ms |" in open(tmp_path / md[0]).read()


def test_target_rows(bench):
    rows = [dict(case="fwd S=2", impl="ours", streams=2, mode="fwd", flops=600e12 * 1e-3, ms=1.0,
                 pct_fp32_logits=1.0),
            dict(case="fwdbwd S=2", impl="ours", streams=2, mode="fwdbwd", flops=400e12 * 1e-3, ms=1.0,
                 pct_fp32_logits=1.0),
            dict(case="fwd S=1", impl="ours", streams=1, mode="fwd", flops=1.0, ms=1.0)]
    out = bench._target_rows(rows)
    assert [r["note"].split(":")[0] for r in out] == ["MET", "MISSED"]
