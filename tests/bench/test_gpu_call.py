"""bench/gpu_call.py: the autotune skip list from the offline sm_90 builds (and the library reading it back), and
the summary's MET / MISSED / NOT RUN verdicts from what the steps left."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import triton

from hydra_kernels.kernels.triton import SKIP_CONFIGS_ENV, skip_listed
from hydra_kernels.kernels.triton import linear_logprobs as llp
from hydra_kernels.kernels.triton import lora_linear as tk
from tests.bench._load import ROOT, load_bench

BUILDS = Path(ROOT) / "bench" / "results" / "triton_sm90_builds"


@pytest.fixture(scope="module")
def gc():
    return load_bench("gpu_call")


def _builds(version):
    return [json.loads(line) for line in (BUILDS / f"triton-{version}.jsonl").read_text().splitlines()]


def _dz(bt, bv, bk, warps, stages):
    return triton.Config({"BT": bt, "BV": bv, "BK": bk, "GROUP": 8}, num_warps=warps, num_stages=stages)


def test_skip_records_of_the_gpu_image_triton(gc):
    """triton 3.6 (the GPU image): the three dz configs whose stack frame is over 32 bytes, at the stream count
    they were built for; nothing that is not autotuned (logprobs_*), nothing that built cleanly."""
    recs, why = gc.skip_records(_builds("3.6.0"))
    got = sorted((r["kernel"], r["where"]["streams"], r["kwargs"]["BT"], r["kwargs"]["BV"], r["num_warps"])
                 for r in recs)
    assert got == [("linear_logprobs_dz", 1, 128, 256, 8), ("linear_logprobs_dz", 2, 64, 256, 8),
                   ("linear_logprobs_dz", 2, 128, 64, 4)]
    assert all(w["stack"] > 32 and w["ok"] for w in why)
    assert all(r["where"]["fp32"] is False and set(r["kwargs"]) == {"BT", "BV", "BK", "GROUP"} for r in recs)
    # a build that failed is left out whatever its registers; a looser threshold keeps more
    failed = dict(_builds("3.6.0")[-1], ok=False)
    recs2, _ = gc.skip_records([failed])
    assert len(recs2) == 1 and recs2[0]["kernel"] == "lora_wgrad" and recs2[0]["where"] == {"r_pad": 64}
    assert gc.skip_records(_builds("3.6.0"), max_stack_bytes=64)[0][0]["kwargs"]["BV"] == 64


def test_the_autotuners_drop_the_listed_configs(gc, tmp_path, monkeypatch):
    recs, _ = gc.skip_records(_builds("3.6.0"))
    path = tmp_path / "skip.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    configs = [_dz(128, 128, 64, 8, 3), _dz(128, 64, 64, 4, 4), _dz(64, 256, 64, 8, 3), _dz(128, 256, 64, 8, 3)]
    assert llp._prune_dz(configs, {}, NS=2, FP32=False) == configs[:3]          # unset: only the register rule
    monkeypatch.setenv(SKIP_CONFIGS_ENV, str(path))
    assert llp._prune_dz(configs, {}, NS=2, FP32=False) == configs[:1]          # S=2: 128x64 w4, 64x256 listed
    assert llp._prune_dz(configs, {}, NS=1, FP32=False) == configs[:3]          # S=1: 128x256 listed
    assert llp._prune_dz(configs, {}, NS=2, FP32=True) == configs[:3]           # built as bf16 only
    assert skip_listed("linear_logprobs_dz", configs[1:3], streams=2, fp32=False) == configs[1:3]   # all: kept
    # LoRA GEMM: a record for bf16, r_pad 16
    cfg = tk._GEMM_CLASSES["large"][2]                                          # 128x256x64, 8 warps, 3 stages
    rec = {"kernel": "lora_gemm", "kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps,
           "num_stages": cfg.num_stages, "where": {"dtype": "bf16", "r_pad": 16}}
    path = tmp_path / "skip_lora.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    args = {"x_ptr": SimpleNamespace(dtype=torch.bfloat16)}
    kw = dict(R_PAD=16, ROWS_BUCKET=512, COMPUTE_Y=True)
    monkeypatch.delenv(SKIP_CONFIGS_ENV)
    full16 = tk._prune_gemm(tk._GEMM_CONFIGS, args, **kw)
    full64 = tk._prune_gemm(tk._GEMM_CONFIGS, args, **dict(kw, R_PAD=64))
    monkeypatch.setenv(SKIP_CONFIGS_ENV, str(path))
    assert cfg in full16 and tk._prune_gemm(tk._GEMM_CONFIGS, args, **kw) == [c for c in full16 if c is not cfg]
    assert tk._prune_gemm(tk._GEMM_CONFIGS, args, **dict(kw, R_PAD=64)) == full64     # listed for r_pad 16 only
    fp16 = {"x_ptr": SimpleNamespace(dtype=torch.float16)}
    assert cfg in tk._prune_gemm(tk._GEMM_CONFIGS, fp16, **kw)                         # and for bf16 only


def test_an_unreadable_skip_list_names_the_variable(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"kernel": "lora_gemm"}\n')
    monkeypatch.setenv(SKIP_CONFIGS_ENV, str(bad))
    with pytest.raises(ValueError, match=SKIP_CONFIGS_ENV):
        skip_listed("lora_gemm", [_dz(64, 64, 64, 4, 4)])
    monkeypatch.setenv(SKIP_CONFIGS_ENV, str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match=SKIP_CONFIGS_ENV):
        skip_listed("lora_gemm", [_dz(64, 64, 64, 4, 4)])


def test_prepare_writes_env_and_the_skip_list(gc, tmp_path):
    env = gc.prepare(str(tmp_path), None)
    assert json.loads((tmp_path / "env.json").read_text())["versions"]["torch"] == torch.__version__
    lines = (tmp_path / "skip_configs.jsonl").read_text().splitlines()
    sk = env["skip_configs"]
    assert len(lines) == len(sk["skipped"])
    if (BUILDS / f"triton-{triton.__version__}.jsonl").exists():
        assert sk["builds_read"] > 0
    else:
        assert sk["builds_read"] == 0 and not lines and "every config is autotuned" in sk["note"]


def _junit(path, results):
    cases = "".join(f'<testcase classname="t" name="{n}">' + ("<failure/>" if not ok else "") + "</testcase>"
                    for n, ok in results)
    path.write_text(f"<testsuites><testsuite tests='{len(results)}'>{cases}</testsuite></testsuites>")


def test_summary_verdicts(gc, tmp_path):
    w = tmp_path
    (w / "steps.tsv").write_text("prepare\trc=0\t0.1\t4.0\t20.0\t\n"
                                 "tests_triton\trc=0\t4.2\t80.0\t120.0\t\n"
                                 "tests_cuda\trc=0\t90.0\t20.0\t45.0\t\n"
                                 "lora\trc=0\t111.0\t40.0\t50.0\t\n"
                                 "logprobs\trc=124\t152.0\t25.0\t25.0\t\n"
                                 "linear_logprobs\tskipped\t180.0\t0\t0\tno time left\n")
    _junit(w / "tests_triton.xml", [("a", True), ("b", True)])
    _junit(w / "tests_cuda.xml", [("c", True), ("d", False)])
    t = dict(issue="issue 2", target="x", need="≥ 1.8×")
    (w / "lora_linear_h200_one.json").write_text(json.dumps({"ceilings": {"hbm_copy_GBps": 4300.0,
                                                                          "bf16_gemm_TFLOPs": 780.0},
        "targets": [dict(t, id="lora.2stream_vs_separate", where="16 rows", value=2.1, ok=True),
                    dict(t, id="lora.2stream_vs_separate", where="64 rows", value=1.9, ok=True),
                    dict(t, id="lora.cuda_2stream_hbm", where="16 rows", value=0.7, need="≥ 0.80 of HBM", ok=False),
                    dict(t, id="lora.cuda_2stream_hbm", where="64 rows", value=0.85, need="≥ 0.80 of HBM",
                         ok=True)]}))
    s = gc.summarize(w, "gpu_one_x.tgz")
    v = {x["id"]: x for x in s["verdicts"]}
    assert v["correctness.triton"]["verdict"] == "MET"
    assert v["correctness.cuda"]["verdict"] == "MISSED" and s["targets"][1]["failures"] == ["t::d"]
    assert v["lora.2stream_vs_separate"]["verdict"] == "MET"
    assert v["lora.2stream_vs_separate"]["value"] == 1.9                     # the closest to its threshold
    assert v["lora.cuda_2stream_hbm"]["verdict"] == "MISSED" and v["lora.cuda_2stream_hbm"]["where"] == "16 rows"
    assert v["lora.fwdbwd_vs_peft"]["verdict"] == "NOT RUN" and "did not measure" in v["lora.fwdbwd_vs_peft"]["why"]
    assert "hit its 25 s limit" in v["logprobs.ours_hbm"]["why"]
    assert "skipped: no time left" in v["linear_logprobs.fwd_tflops"]["why"]
    # bench/bench_memory.py exists, so a memory verdict without its step says the step did not run
    assert v["memory.batch_vs_lora"]["verdict"] == "NOT RUN"
    assert v["memory.batch_vs_lora"]["why"] == "step memory did not run"
    assert any("HBM copy 4300 GB/s" in line for line in s["info"])
    md = (w / "summary.md").read_text()
    assert "| CUDA parity subset passes | issue 15 |" in md and "MISSED" in md
    assert json.loads((w / "summary.json").read_text())["tarball"] == "gpu_one_x.tgz"


def test_summary_of_an_empty_folder(gc, tmp_path):
    s = gc.summarize(tmp_path)
    assert {x["verdict"] for x in s["verdicts"]} == {"NOT RUN"} and (tmp_path / "summary.md").exists()
