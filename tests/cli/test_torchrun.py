"""`python -m torch.distributed.run --nproc_per_node 2 -m hydra_kernels.cli ppo ...`: the CLI under a launcher
detects the process group (run.parallel null -> ddp), prints its JSON once, exports once, and records
world_size; the same command at one process gives the same result (tests/rlhf/test_distributed.py holds the
tolerances; here a loose check that the two ran the same step)."""
import json
import math
import subprocess
import sys

import pytest

from tests.cli._local import PPO_SMALL, ROOT, env, make_local


def _ppo(nproc, paths, out, merge_to):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
           "hydra_kernels.cli", "ppo", f"model.path={paths['sft']}", f"data.prompt_path={paths['prompts']}",
           f"run.output_dir={out}", *PPO_SMALL, "steps=2", "--merge-to", str(merge_to)]
    return subprocess.run(cmd, cwd=ROOT, env=env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    return make_local(tmp_path_factory.mktemp("cli_torchrun"))


def test_cli_ppo_under_torchrun_two_processes(local, tmp_path):
    from transformers import AutoModelForCausalLM
    runs = {}
    for n in (2, 1):
        proc = _ppo(n, local, tmp_path / f"ppo{n}", tmp_path / f"policy{n}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads(proc.stdout)                  # one JSON document: rank 0's alone
        assert info["steps"] == 2 and info["merged_policy"] == str(tmp_path / f"policy{n}")
        rows = [json.loads(line) for line in open(tmp_path / f"ppo{n}" / "metrics.jsonl")]
        assert [r["world_size"] for r in rows] == [n, n]
        runs[n] = rows
        AutoModelForCausalLM.from_pretrained(str(tmp_path / f"policy{n}"), local_files_only=True)
    for a, b in zip(runs[2], runs[1]):
        for k in ("objective/scores", "objective/kl", "loss/policy_avg", "val/num_eos_tokens"):
            assert math.isclose(a[k], b[k], rel_tol=1e-4, abs_tol=1e-6), (k, a[k], b[k])
