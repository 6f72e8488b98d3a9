"""Ctrl-C in the middle of `hydra-rlhf ppo`, then the same command again (python -m hydra_kernels.cli).

Expected: no traceback, one line saying where the run will continue from, exit status 130 (128 + SIGINT, as shells report it); the same command then finishes the run, to the same result as
a run never interrupted.
"""
import json
import signal
import subprocess
import sys
import time

import pytest

from tests.cli._local import PPO_SMALL, ROOT, env, error_lines, make_local

# Sleeps (once, until interrupted) in the second call, i.e. in step 2, after step 1's checkpoint.
SLOW_REWARD = """
import os, time
calls = 0
def reward(prompts, completions, ended):
    global calls
    calls += 1
    marker = os.environ["HYDRA_TEST_MARKER"]
    if calls == 2 and not os.path.exists(marker):
        open(marker, "w").close()
        time.sleep(120)
    return [0.1 * len(c) for c in completions]
"""


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_interrupt")
    paths = make_local(root)
    (root / "slow.py").write_text(SLOW_REWARD)
    return root, paths


def _args(root, paths, out):
    small = [a for a in PPO_SMALL if not a.startswith("steps=")]
    return [sys.executable, "-m", "hydra_kernels.cli", "ppo", f"model.path={paths['sft']}",
            f"data.prompt_path={paths['prompts']}", f"run.output_dir={out}", "steps=3", "run.checkpoint_every=1",
            *small, "--reward-fn", f"{root / 'slow.py'}:reward"]


def _scores(out):
    return [json.loads(line)["objective/scores"] for line in open(out / "metrics.jsonl")]


def test_ctrl_c_then_the_same_command(local, tmp_path):
    root, paths = local
    marker = tmp_path / "sleeping"
    e = env(HYDRA_TEST_MARKER=str(marker))
    args = _args(root, paths, tmp_path / "ppo")
    proc = subprocess.Popen(args, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = error_lines(err)
    assert "Traceback" not in err, err[-3000:]
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert len(lines) == 1 and "interrupted" in lines[0], lines
    assert "step-00000001" in lines[0], lines             # says where the same command continues from

    again = subprocess.run(args, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["steps"] == 3

    ref = subprocess.run(_args(root, paths, tmp_path / "ref"), cwd=ROOT, env=e, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert _scores(tmp_path / "ppo") == _scores(tmp_path / "ref")
