"""Several processes (rlhf.distributed): 2 processes give what 1 process gives with the same global batch.

The runs are tests/rlhf/_dist_job.py under torchrun (gloo on the CPU, one thread per rank), each a few seconds:
PPO of every variant, GRPO (four estimators, a group split over the ranks) and Hydra-SFT (lora, full) at 1 and
2 processes, a checkpoint at one world size resumed at
the other, and a rank whose reward function raises.

Tolerance (fp32, reduction order only): trained tensors within ATOL absolute — 1 % of one Adam step at the jobs'
lr 0.01: Adam divides each element by its own gradient's size, so the ~1e-7 relative noise of a reordered sum
shows up amplified in elements whose gradient nearly cancels (measured: 2.2e-5 in full PPO, ≤ 1.3e-6 elsewhere)
— and metrics within RTOL relative (measured ≤ 3.4e-5).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hydra_kernels.rlhf import distributed
from hydra_kernels.rlhf.config import PPOConfig
from hydra_kernels.rlhf.rollout import sample_next
from tests._util import ROOT, torchrun

JOB = Path(__file__).with_name("_dist_job.py")
VARIANTS = ("hydra", "j-hydra", "lora", "full")
ESTIMATORS = ("grpo", "dapo", "rloo", "reinforce_pp_baseline")
ATOL = 1e-4
RTOL = 1e-4
# Not compared: wall-clock and memory readings, and the world size itself.
LOCAL_METRICS = ("time/", "eps", "memory/", "world_size")
# The reward head's bias cancels in r(chosen) − r(rejected): its gradient is exactly 0 up to rounding noise,
# which Adam turns into a full step of either sign at any world size; it is not compared.
NOISE_ONLY = ("head.bias",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    for n in (1, 2):
        torchrun(JOB, n, "equiv", str(root / f"w{n}"), timeout=600)
    return root


def _result(d: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    return load_file(str(d / "result" / "result.safetensors")), json.loads((d / "result" / "history.json").read_text())


def _assert_same(a: Path, b: Path) -> None:
    (ta, ha), (tb, hb) = _result(a), _result(b)
    assert set(ta) == set(tb)
    for k in ta:
        if k not in NOISE_ONLY:
            err = (ta[k] - tb[k]).abs().max().item()
            assert err <= ATOL, f"{k}: |Δ| {err:.3g} > {ATOL}"
    assert len(ha) == len(hb) and ha
    for ra, rb in zip(ha, hb):
        assert set(ra) == set(rb)
        for k, v in rb.items():
            if k.startswith(LOCAL_METRICS):
                continue
            if isinstance(v, float) and not isinstance(v, bool):
                assert math.isclose(ra[k], v, rel_tol=RTOL, abs_tol=1e-6), (k, ra[k], v)
            else:
                assert ra[k] == v, (k, ra[k], v)


@pytest.mark.parametrize("name", [*VARIANTS, *ESTIMATORS, "sft-lora", "sft-full"])
def test_two_processes_train_as_one(runs, name):
    _assert_same(runs / "w2" / name, runs / "w1" / name)
    for n in (1, 2):
        history = _result(runs / f"w{n}" / name)[1]
        assert {r["world_size"] for r in history} == {n}
        lines = [json.loads(x) for x in (runs / f"w{n}" / name / "metrics.jsonl").read_text().splitlines()]
        assert lines == history                   # one writer: each line once, none interleaved


def test_the_saved_config_records_the_world_size(runs):
    for n in (1, 2):
        meta = json.loads((runs / f"w{n}" / "hydra" / "final" / "policy.json").read_text())
        assert meta["world_size"] == n
        ck = runs / f"w{n}" / "stopped" / "checkpoints"
        (state,) = [json.loads((d / "state.json").read_text()) for d in ck.iterdir()]
        assert state["config"]["world_size"] == n
        sft = json.loads((runs / f"w{n}" / "sft-full" / "final" / "sft.json").read_text())
        assert sft["world_size"] == n
        # Written once, atomically: no temporary directory left next to the checkpoints or the result.
        assert [d.name for d in ck.iterdir()] == ["step-00000001"]
        assert sorted(p.name for p in (runs / f"w{n}" / "hydra").iterdir()) == [
            "checkpoints", "final", "metrics.jsonl", "result"]


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_resume_at_another_world_size(runs, tmp_path, saved, resumed):
    out = tmp_path / "run"
    shutil.copytree(runs / f"w{saved}" / "stopped", out)
    log = torchrun(JOB, resumed, "resume", str(out), timeout=300)
    assert "resuming from step 1" in log
    _assert_same(out, runs / "w1" / "hydra")
    assert [r["world_size"] for r in json.loads((out / "result" / "history.json").read_text())] == [saved, resumed]


# ------------------------------------------------------------------------------------------- fsdp2
# run.parallel=fsdp2 at 2 processes against none at 1 (tolerances as above; measured: 2.2e-5 in full PPO,
# <= 1.2e-6 elsewhere, metrics <= 9e-5 relative).
FSDP2_RUNS = (*VARIANTS, "j-hydra-sampled", "grpo", "sft-lora", "sft-full")


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp2")
    for n in (1, 2):
        torchrun(JOB, n, "fsdp2", str(root / f"w{n}"), timeout=600)
    return root


@pytest.mark.parametrize("name", FSDP2_RUNS)
def test_fsdp2_two_processes_train_as_one(fsdp2_runs, name):
    _assert_same(fsdp2_runs / "w2" / name, fsdp2_runs / "w1" / name)
    lines = [json.loads(x) for x in (fsdp2_runs / "w2" / name / "metrics.jsonl").read_text().splitlines()]
    assert lines == _result(fsdp2_runs / "w2" / name)[1] and {r["world_size"] for r in lines} == {2}
    if name not in VARIANTS:
        return
    # Exported as the CLI does (collective, rank 0 writes): the same files and weights as one process.
    one, two = fsdp2_runs / "w1" / name, fsdp2_runs / "w2" / name
    dirs = ["merged", "base", "peft"] if name in ("hydra", "j-hydra") else ["merged"]
    for d in dirs:
        files = sorted(p.name for p in (one / d).iterdir())
        assert files == sorted(p.name for p in (two / d).iterdir()) and files, d
        for f in files:
            if f.endswith(".safetensors"):
                a, b = load_file(str(one / d / f)), load_file(str(two / d / f))
                assert set(a) == set(b) and all((a[k] - b[k]).abs().max() <= ATOL for k in a), (d, f)
    assert json.loads((one / "samples.json").read_text()) == json.loads((two / "samples.json").read_text())


@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_fsdp2_checkpoint_resumes_at_another_world_size(fsdp2_runs, tmp_path, saved, resumed):
    out = tmp_path / "run"
    shutil.copytree(fsdp2_runs / f"w{saved}" / "stopped", out)
    (ck,) = (out / "checkpoints").iterdir()
    assert json.loads((ck / "state.json").read_text())["config"]["run"]["parallel"] == \
        ("fsdp2" if saved == 2 else "none")
    log = torchrun(JOB, resumed, "resume-fsdp2", str(out), timeout=300)
    assert "resuming from step 1" in log
    _assert_same(out, fsdp2_runs / "w1" / "hydra")
    assert (out / "final" / "policy.json").is_file()


def test_fsdp2_refuses_what_cannot_work(monkeypatch):
    with pytest.raises(ValueError, match="compile_rollout: true is not supported with run.parallel=fsdp2"):
        PPOConfig(compile_rollout=True, run={"parallel": "fsdp2"})
    from hydra_kernels.rlhf.config import GRPOConfig
    with pytest.raises(ValueError, match="compile_rollout: true is not supported with run.parallel=fsdp2"):
        GRPOConfig(compile_rollout=True, run={"parallel": "fsdp2"})
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="run.parallel: 'fsdp2' shards the models over several processes, but 1"):
        distributed.parallel_mode(PPOConfig(run={"parallel": "fsdp2"}).run)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.parallel_mode(PPOConfig(run={"parallel": "fsdp2"}).run) == "fsdp2"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_a_failure_on_one_rank_fails_the_job(tmp_path, parallel):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(JOB), "fail", str(tmp_path / "run"), f"run.parallel={parallel}"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=180)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "reward function failed on rank 1" in proc.stdout
    assert "JOB OK" not in proc.stdout


# ------------------------------------------------------------------------------------- one process
def test_per_row_generators_make_a_row_independent_of_its_batch():
    logits = torch.randn(4, 50)
    gens = lambda rows: [torch.Generator().manual_seed(100 + r) for r in rows]     # noqa: E731
    whole = sample_next(logits, 1.0, 0.9, gens(range(4)))
    halves = torch.cat([sample_next(logits[:2], 1.0, 0.9, gens(range(2))),
                        sample_next(logits[2:], 1.0, 0.9, gens(range(2, 4)))])
    assert torch.equal(whole, halves)
    with pytest.raises(ValueError, match="generator: 3 generators for 4 rows"):
        sample_next(logits, 1.0, 1.0, gens(range(3)))


def test_parallel_mode_from_the_environment(monkeypatch):
    run = PPOConfig().run
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.parallel_mode(run) == "none"
    run.parallel = "ddp"
    assert distributed.parallel_mode(run) == "ddp"           # a world of one
    monkeypatch.setenv("WORLD_SIZE", "2")
    run.parallel = None
    assert distributed.parallel_mode(run) == "ddp"
    run.parallel = "none"
    with pytest.raises(ValueError, match="run.parallel: 'none' but 2 processes"):
        distributed.parallel_mode(run)
    with pytest.raises(ValueError, match="run.parallel: must be one of"):
        PPOConfig(run={"parallel": "fsdp"})
    run.parallel, run.device = "ddp", "cuda:1"
    with pytest.raises(ValueError, match="run.device: 'cuda:1' puts every process on one GPU"):
        distributed.setup(run)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE: must be an integer"):
        distributed.env_world_size()


def test_one_process_helpers_are_the_identity():
    t = torch.arange(6.).reshape(2, 3)
    assert distributed.gather_rows(t) is t and distributed.all_sum(t) is t
    assert distributed.block(5) == (0, 5) and distributed.on_rank0(lambda: 7) == 7
    assert {k: float(v) for k, v in distributed.sum_dict({"a": 2, "b": torch.tensor(1.5)}).items()} == \
        {"a": 2.0, "b": 1.5}
