"""`python -m torch.distributed.run --nproc_per_node 2 -m hydra_kernels.cli ppo ...`: the CLI under a launcher
detects the process group (run.parallel null -> ddp), prints its JSON once, exports once, and records
world_size; the same command at one process gives the same result (tests/rlhf/test_distributed.py holds the
tolerances; here a loose check that the two ran the same step)."""
import json
import math
import subprocess
import sys

import pytest

from tests.cli._local import PPO_SMALL, ROOT, SFT_SMALL, env, make_local


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


def test_cli_sft_and_ppo_under_torchrun_with_fsdp2(local, tmp_path):
    """run.parallel=fsdp2 through the CLI: Hydra-SFT, then PPO with every export (collective, rank 0 writes)."""
    from transformers import AutoModelForCausalLM
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                "hydra_kernels.cli"]
    sft = subprocess.run([*launcher, "sft", f"model.path={local['model']}", f"data.sft_path={local['demos']}",
                          f"data.preference_path={local['pairs']}", f"run.output_dir={tmp_path / 'sft'}",
                          *SFT_SMALL, "run.parallel=fsdp2"],
                         cwd=ROOT, env=env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert sft.returncode == 0, sft.stderr[-3000:]
    assert json.loads((tmp_path / "sft" / "final" / "sft.json").read_text())["world_size"] == 2
    proc = subprocess.run([*launcher, "ppo", f"model.path={tmp_path / 'sft' / 'final'}",
                           f"data.prompt_path={local['prompts']}", f"run.output_dir={tmp_path / 'ppo'}", *PPO_SMALL,
                           "run.parallel=fsdp2", "--merge-to", str(tmp_path / "policy"), "--export-peft",
                           str(tmp_path / "peft"), "--samples", "2"],
                          cwd=ROOT, env=env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout)                      # one JSON document: rank 0's alone
    assert info["merged_policy"] == str(tmp_path / "policy") and info["peft_adapter"] == str(tmp_path / "peft")
    assert len(info["samples"]) == 2
    assert proc.stderr.count("sample completions") == 1
    assert [json.loads(line)["world_size"] for line in open(tmp_path / "ppo" / "metrics.jsonl")] == [2]
    AutoModelForCausalLM.from_pretrained(str(tmp_path / "policy"), local_files_only=True)
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
