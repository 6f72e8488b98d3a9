"""bench/bench_lora_linear.py: the CPU quick mode runs end to end and writes JSON + Markdown; the target
checks read the results the way the GPU run will."""
import json
import os

import pytest

from tests.bench._load import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_lora_linear")


def test_cpu_quick_mode_writes_results(bench, tmp_path):
    assert bench.main(["--cpu", "--quick", "--repeats", "2", "--out", str(tmp_path), "--tag", "smoke"]) == 0
    js = [f for f in os.listdir(tmp_path) if f.endswith("_smoke.json")]
    md = [f for f in os.listdir(tmp_path) if f.endswith("_smoke.md")]
    assert len(js) == 1 and len(md) == 1
    result = json.load(open(tmp_path / js[0]))
    assert result["meta"]["mode"] == "cpu" and result["meta"]["date"] and result["meta"]["torch"]
    timed = [r for r in result["results"] if r["ms"] is not None]
    providers = {r["provider"] for r in timed}
    assert {"torch", "base", "peft", "separate"} <= providers
    assert {r["case"] for r in timed} == set(bench.CASES)
    assert all(r["ms"] > 0 and r["tflops"] > 0 for r in timed)
    text = open(tmp_path / md[0]).read()
    assert "| K→N | r | rows/stream |" in text and "base_actor_critic" in text


def test_targets_are_evaluated_from_rows(bench):
    Row = bench.Row
    rows = [Row(4096, 4096, 64, 2048, "actor_fwd_bwd", "fused", ms=1.0),
            Row(4096, 4096, 64, 2048, "actor_fwd_bwd", "peft", ms=1.5),
            Row(4096, 4096, 64, 2048, "actor_fwd_bwd", "base", ms=0.95),
            Row(4096, 4096, 16, 16, "base_actor", "fused", ms=0.01, weight_gbps=3400.0),
            Row(4096, 4096, 16, 16, "base_actor", "separate", ms=0.017)]
    got = {t["target"]: t for t in bench.evaluate_targets(rows, {"hbm_copy_GBps": 4300.0})}
    assert got["fwd+bwd ≥1.3× vs unfused"]["ok"] and got["fwd+bwd ≤1.10× base GEMM"]["ok"]
    assert not got["2 streams ≥1.8× vs separate passes"]["ok"]          # 1.7×
    assert got["2 streams ≥75% HBM on weight bytes"]["ok"]               # 79%


def test_flop_and_byte_accounting(bench):
    import torch
    p = bench.make_problem(32, 48, 4, 5, "base_actor_critic", "cpu", torch.float32)
    assert bench.flops(p) == 2 * 15 * 32 * 48 + 2 * 10 * 4 * (32 + 48)
    wb, tb = bench.min_bytes(p)
    assert wb == 48 * 32 * 4 and tb == wb + 15 * (32 + 48) * 4 + 2 * 4 * (32 + 48) * 4
