"""bench/bench_decode.py: the CPU smoke mode runs end to end in seconds, times every impl and checks that they
all decode the same tokens (lora_B is zero, so peft's and Hydra's adapted models are the plain model)."""
import json
import os

import pytest

from tests.bench._load import ROOT, load_bench


@pytest.fixture(scope="module")
def bench():
    return load_bench("bench_decode")


def test_smoke_writes_results(bench, tmp_path):
    assert bench.main(["--cpu", "--quick", "--new-tokens", "6", "--reps", "1", "--out", str(tmp_path)]) == 0
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert os.path.exists(tmp_path / js.replace(".json", ".md"))
    result = json.load(open(tmp_path / js))
    assert result["device_type"] == "cpu" and result["date"] and result["versions"]["torch"]
    rows = {r["impl"]: r for r in result["results"]}
    assert set(rows) == {"hf", "peft", "hydra-actor", "hydra-base", "rollout-actor"}
    for r in rows.values():
        assert r["ms_per_token"] > 0 and r["tokens_per_s"] > 0 and len(r["raw_s"]) == 1
        assert r["same_tokens_as_hf"] == 1.0, r["impl"]          # fp32 on CPU: exactly the same function
    assert rows["peft"]["x_vs_peft"] == pytest.approx(1.0) and rows["hf"]["overhead_vs_hf"] == pytest.approx(1.0)


def test_static_cache_compiled_rows(tmp_path):
    """--compile (the GPU default): transformers' static-cache generate, torch.compiled, for HF and Hydra's actor,
    and the PPO rollout loop compiled. In a fresh interpreter: compiling in the test process would leave Inductor's
    worker threads there, and later tests that fork (bench_ppo_variants' CPU rows) must not inherit them."""
    import subprocess
    import sys
    args = ["--cpu", "--quick", "--compile", "--new-tokens", "4", "--reps", "1", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_decode.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (js,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    rows = {r["impl"]: r for r in json.load(open(tmp_path / js))["results"]}
    for impl in ("hf-static-compiled", "hydra-actor-static-compiled", "rollout-actor-compiled"):
        assert "error" not in rows[impl], rows[impl]
        assert rows[impl]["same_tokens_as_hf"] == 1.0 and rows[impl]["first_call_s"] > 0


def test_bad_arguments_name_the_option(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--cpu", "--new-tokens", "0"])
    assert "--new-tokens" in capsys.readouterr().err
