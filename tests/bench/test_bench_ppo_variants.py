"""bench/bench_ppo_variants.py: the --quick CPU run measures every row (4 variants x activation checkpointing off/on,
each in its own process) and writes JSON + Markdown; the parameter accounting matches the variants' definitions;
an OOM row is shown as such and does not break the ratios of the others."""
import json
import math
import os

import pytest
import torch

from tests.bench._load import load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_ppo_variants")


@pytest.fixture(scope="module")
def quick(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_variants")
    assert bench.main(["--cpu", "--quick", "--out", str(out), "--tag", "smoke"]) == 0
    js = [f for f in os.listdir(out) if f.endswith("_smoke.json")]
    md = [f for f in os.listdir(out) if f.endswith("_smoke.md")]
    assert len(js) == 1 and len(md) == 1
    return json.load(open(out / js[0])), open(out / md[0]).read()


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def test_every_row_measured_with_finite_numbers(bench, quick):
    result, _ = quick
    meta, s = result["meta"], result["settings"]
    assert meta["device_type"] == "cpu" and meta["date"] and meta["versions"]["torch"]
    assert meta["versions"]["transformers"]
    assert s["model"] == "tiny" and s["quick"]
    rows = {(r["variant"], r["activation_checkpointing"]): r for r in result["rows"]}
    assert set(rows) == {(v, ck) for v in bench.VARIANTS for ck in (False, True)}
    for key, r in rows.items():
        assert r["status"] == "ok", (key, r.get("error"), r.get("traceback") or r.get("log_tail"))
        assert len(r["steps"]) == s["steps"]
        for name in ("params_held", "params_trainable", "bytes_held", "bytes_trainable", "optimizer_state_bytes"):
            assert _finite(r[name]) and r[name] > 0, (key, name, r[name])
        last = r["steps"][-1]
        for ph in bench.PHASES:
            assert _finite(last[f"time_{ph}_s"]) and last[f"time_{ph}_s"] > 0, (key, ph)
            assert _finite(last[f"peak_{ph}_mib"]) and last[f"peak_{ph}_mib"] > 0, (key, ph)
        assert _finite(r["last"]["peak_step_mib"]) and _finite(r["last"]["time_step_s"])
        assert _finite(r["memory_vs_full"]) and _finite(r["memory_vs_lora"]) and _finite(r["time_vs_lora"])
        # Every response is full length (EOS is outside the vocabulary) and no batch was skipped.
        assert all(st["response_length"] == s["response_len"] and not st["skipped"] for st in r["steps"])
    for ck in (False, True):
        assert rows[("full", ck)]["memory_vs_full"] == 1.0 and rows[("lora", ck)]["time_vs_lora"] == 1.0


def test_parameter_accounting_matches_the_variants(bench, quick):
    """full: 4 copies of the model; lora: the same + 2 adapters; hydra: 1 copy + 2 adapters; j-hydra: 1 + 1; the
    heads (reward + value, hidden + 1 each) everywhere. Hydra trains exactly what LoRA-PPO trains."""
    result, _ = quick
    model = bench.build_model("tiny", torch.device("cpu"), torch.float32, 64)
    n_model = sum(p.numel() for p in model.parameters())
    heads = 2 * (bench.MODELS["tiny"]["hidden_size"] + 1)
    for ck in (False, True):
        r = {x["variant"]: x for x in result["rows"] if x["activation_checkpointing"] == ck}
        held = {v: r[v]["params_held"] for v in r}
        trainable = {v: r[v]["params_trainable"] for v in r}
        value_head = heads // 2
        two_adapters = trainable["hydra"] - value_head
        assert held["full"] == 4 * n_model + heads
        assert held["lora"] == held["full"] + two_adapters
        assert held["hydra"] == n_model + two_adapters + heads
        assert held["j-hydra"] == n_model + two_adapters // 2 + heads
        assert trainable["lora"] == trainable["hydra"] and trainable["j-hydra"] == two_adapters // 2 + value_head
        # the paper's point: one base instead of four; far less to train than full PPO
        assert held["j-hydra"] < held["hydra"] < held["full"] / 3 < held["lora"] / 3
        assert trainable["hydra"] < trainable["full"] / 5
        assert r["hydra"]["optimizer_state_bytes"] < r["full"]["optimizer_state_bytes"] / 5


def test_markdown_table(quick):
    _, md = quick
    assert "| variant | act. ckpt | params held (M) | trainable (M) | step peak GiB | mem vs full |" in md
    for name in ("full PPO", "LoRA-PPO", "Hydra-PPO", "J-Hydra-PPO", "## Per phase"):
        assert name in md


def test_oom_row_is_reported_and_others_keep_their_ratios(bench):
    def ok(variant, peak, t):
        return {"variant": variant, "activation_checkpointing": False, "status": "ok", "memory_baseline_mib": 0.0,
                "params_held": 4e6, "params_trainable": 1e6, "steps": [{"peak_step_mib": peak, "time_step_s": t}]}
    rows = [{"variant": "full", "activation_checkpointing": False, "status": "OOM",
             "error": "OutOfMemoryError: CUDA out of memory"},
            ok("lora", 1000.0, 2.0), ok("hydra", 400.0, 1.5)]
    bench.summarize(rows)
    by = {r["variant"]: r for r in rows}
    assert by["full"]["memory_vs_lora"] is None and by["hydra"]["memory_vs_full"] is None
    assert by["hydra"]["memory_vs_lora"] == pytest.approx(0.4) and by["hydra"]["time_vs_lora"] == pytest.approx(0.75)
    table = "\n".join(bench.short_table({"rows": rows}))
    assert "| full PPO | off | - | - | OOM |" in table
    assert "0.40x" in table and "0.75x" in table


def test_subprocess_isolation_the_gpu_default(bench, tmp_path):
    """On a GPU every row is a fresh interpreter (--isolation subprocess); the same path, one row, on CPU."""
    assert bench.main(["--cpu", "--quick", "--isolation", "subprocess", "--variants", "hydra", "--checkpointing",
                       "on", "--steps", "2", "--out", str(tmp_path)]) == 0
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.load(open(tmp_path / js))
    (row,) = result["rows"]
    assert result["meta"]["isolation"] == "subprocess" and row["isolation"] == "subprocess"
    assert row["status"] == "ok", row.get("error") or row.get("log_tail")
    assert row["variant"] == "hydra" and row["activation_checkpointing"] and len(row["steps"]) == 2
    assert row["memory_vs_lora"] is None and _finite(row["last"]["peak_step_mib"])


def test_compile_rollout_rows(bench, tmp_path):
    """--compile-rollout runs the rows with PPOConfig.compile_rollout (and says so in the settings and table)."""
    # A fresh interpreter per row: Inductor must not compile in a fork of a process whose threads it cannot own.
    assert bench.main(["--cpu", "--quick", "--variants", "hydra", "--checkpointing", "off", "--steps", "2",
                       "--compile-rollout", "--isolation", "subprocess", "--out", str(tmp_path)]) == 0
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    result = json.load(open(tmp_path / js))
    (row,) = result["rows"]
    assert result["settings"]["compile_rollout"] is True
    assert row["status"] == "ok", row.get("error") or row.get("log_tail")
    md = open(tmp_path / js.replace(".json", ".md")).read()
    assert "compile_rollout" in md
