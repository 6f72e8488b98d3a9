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
    assert {r["impl"] for r in timed} == {"ours", "eager", "materialized", "chunked"}    # compile, liger: GPU only
    assert result["complete"] is True
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


def test_eager_matches_chunked_fp32(bench):
    """The eager baseline computes the same function as the others (fp32 on CPU)."""
    import torch
    g = torch.Generator().manual_seed(0)
    hs = [torch.randn(20, 16, generator=g) for _ in range(2)]
    w = torch.randn(50, 16, generator=g)
    tg = torch.randint(0, 50, (20,), generator=g)
    for S in (1, 2):
        a, b = bench._eager(hs[:S], w, tg, 0.7, S), bench._chunked(hs[:S], w, tg, 0.7, S)
        for x, y in zip(a, b):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_compiling_impls_run_after_the_others_and_rows_are_written_as_they_go(bench, monkeypatch):
    """`compile` is measured after every other impl of every case (a time limit then costs it alone); the table
    keeps case order, impls in IMPLS order; every measured row reaches env["progress"] (the writer) at once."""
    import torch
    seen, measured = [], []
    env = {"device": torch.device("cpu"), "smoke": True, "time": lambda fn: 1.0, "peak": lambda fn: None,
           "progress": lambda rows: seen.append([(r["case"], r["impl"]) for r in rows])}
    args = type("A", (), {"models": [2], "modes": ["fwd", "fwdbwd"], "impls": None, "quick": False})()

    def spy(row, *a, **k):
        measured.append((row["case"], row["impl"]))
        row["ms"] = 1.0
    monkeypatch.setattr(bench, "_measure", spy)
    monkeypatch.setattr(bench, "GPU_ONLY", set())       # `compile` and `liger` in a CPU run (the spy runs nothing)
    rows = bench.bench_linear(args, env)
    impls = [i for _, i in measured]
    assert impls.index("compile") > max(i for i, x in enumerate(impls) if x != "compile")
    assert len(seen) == len(measured) and {x for x in seen[-1] if x[1] in bench.IMPLS} == set(measured)
    cases = sorted({c for c, _ in measured}, key=[c for c, _ in measured].index)
    table = [(r["case"], r["impl"]) for r in rows if r["impl"] in bench.IMPLS]
    assert table == [(c, i) for c in cases for i in bench.IMPLS]
