"""bench/run_gpu.sh without a GPU: stub `nvidia-smi` and `python3` on PATH, the script copied into a scratch tree.

The device call that runs a stage is killed at 600 s and the stage packs its logs and results only at its end, so
every stage must end in time however long its steps run: each step's limit is cut to what is left of the stage's
END (HK_RUN_GPU_END, 575 s by default) and a step with no time left is skipped.
"""
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "run_gpu.sh"
STAGES = {   # stage -> the steps it runs (status.txt names)
    "tests": ["cuda_build", "gpu_tests", "demo_gpu"],
    "bench": ["bench_lora_quick", "bench_logprobs_quick", "tune_cuda_lora"],
    "lora": ["bench_lora_4096", "bench_lora_11008"],
    "logprobs": ["bench_logits", "bench_linear"],
    "ppo": ["bench_ppo"],
    "decode": ["cuda_build", "bench_decode"],
}

PYTHON3_STUB = """#!/usr/bin/env bash
echo "$*" >> "$STUB_LOG"
case "$*" in
  *"import sys, torch, triton, transformers"*) echo "python 3.12 torch 2.11.0+cu130 (stub)"; exit 0 ;;
esac
if [ -n "${STUB_SLEEP:-}" ]; then exec sleep "$STUB_SLEEP"; fi
echo "stub ran: $*"
"""


def _sandbox(tmp_path: Path, **env_extra) -> tuple[Path, dict]:
    if shutil.which("timeout") is None or shutil.which("tar") is None:
        pytest.skip("needs coreutils timeout and tar")
    repo = tmp_path / "repo"
    (repo / "bench").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "bench" / "run_gpu.sh")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python3", PYTHON3_STUB),
                       ("nvidia-smi", "#!/usr/bin/env bash\necho 'name, driver_version'\necho 'NVIDIA H200 (stub), 0'\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "tmp").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HK_RUN_GPU_", "HYDRA_KERNELS_"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", OUT=str(tmp_path / "out"), TMPDIR=str(tmp_path / "tmp"),
               STUB_LOG=str(tmp_path / "python3.log"), **env_extra)
    return repo, env


def _run(repo: Path, env: dict, stage: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The stage in its own process group, killed on a time-out (`timeout` makes a group of its own: the stubs
    then end by themselves, STUB_SLEEP being short)."""
    proc = subprocess.Popen(["bash", str(repo / "bench" / "run_gpu.sh"), stage], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _status(out_dir: Path, stage: str) -> list[str]:
    (tgz,) = out_dir.glob(f"gpu_{stage}_*.tgz")
    with tarfile.open(tgz) as tar:
        return tar.extractfile("./status.txt").read().decode().split("\n")[:-1]


def test_syntax():
    res = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_stage_runs_its_steps_and_packs_them(tmp_path, stage):
    repo, env = _sandbox(tmp_path)
    res = _run(repo, env, stage)
    assert res.returncode == 0, res.stdout + res.stderr
    assert _status(tmp_path / "out", stage) == [f"{name} rc=0" for name in STAGES[stage]]
    assert f"################ summary ({stage})" in res.stdout


def test_unknown_stage_is_refused(tmp_path):
    repo, env = _sandbox(tmp_path)
    res = _run(repo, env, "nope")
    assert res.returncode == 2 and "unknown stage nope" in res.stdout


def test_steps_are_cut_to_the_stage_deadline(tmp_path):
    """Steps that would run for their nominal limits (tests: 240 + 330 + 120 s, over the 600 s a device call gets)
    end by END: the first is interrupted at END - KILL_AFTER, the others are skipped, and the results are packed."""
    end, kill_after = 8, 1
    repo, env = _sandbox(tmp_path, HK_RUN_GPU_END=str(end), HK_RUN_GPU_KILL_AFTER=str(kill_after), STUB_SLEEP="30")
    t0 = time.monotonic()
    res = _run(repo, env, "tests")
    elapsed = time.monotonic() - t0
    assert res.returncode == 0, res.stdout + res.stderr
    assert elapsed < end + 3, elapsed
    assert _status(tmp_path / "out", "tests") == ["cuda_build rc=124", "gpu_tests skipped (no time left)",
                                                  "demo_gpu skipped (no time left)"]
