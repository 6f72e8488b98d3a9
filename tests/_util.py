"""Shared test helpers: tolerances per dtype, a relative error against float64 references, a SIGKILLed job."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# Max |out − ref| / max|ref| allowed for a result computed in `dtype` from inputs rounded to `dtype`.
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().clamp_min(1e-30)
    return ((out - ref).abs().max() / scale).item()


def assert_rel_close(out, ref, dtype, what="", factor=1.0):
    err = rel_err(out, ref)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({dtype})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so a kernel that forgets to write an element is caught."""
    return t.fill_(float("nan"))


def kill_job_when(marker: Path, module: str, *args: str, timeout: float = 240.0) -> None:
    """Run `python -m module *args` from the repo root and SIGKILL it as soon as `marker` exists (a file the
    job writes at the point where it should die): a crash with no chance to clean up."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + timeout
        while not Path(marker).exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, f"the job never wrote {marker}"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def torchrun(script: Path, nproc: int, *args: str, timeout: float = 300.0) -> str:
    """Run `script` under `torchrun --standalone --nproc_per_node nproc` (gloo on the CPU, one thread per rank)
    from the repo root; return the combined output, or fail with it. The script initialises the process group
    itself, with a short timeout, so that a rank that dies makes the others fail instead of hang."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(script), *args]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"torchrun {script.name} ×{nproc} ran past {timeout} s:\n{e.stdout}") from None
    assert proc.returncode == 0, f"torchrun {script.name} ×{nproc} exited {proc.returncode}:\n{proc.stdout}"
    return proc.stdout
