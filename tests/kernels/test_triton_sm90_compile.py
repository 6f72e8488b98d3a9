"""Every Triton kernel compiles for an H100/H200 (sm_90) on a machine without a GPU, as the GPU would build it.

The interpreter runs a kernel's Python, not Triton's compiler: a construct the compiler rejects, a config that
spills registers, dots that no longer lower to tensor-core instructions or loads that lost their 16-byte width
would only show on the GPU. tests/kernels/_triton_sm90.py compiles the riskiest launch configuration of each
kernel family ahead of time with Triton's own pipeline for GPUTarget("cuda", 90, 32), in a subprocess (this
session has TRITON_INTERPRET=1, under which @triton.jit gives interpreter objects), and reads the cubin with the
cuobjdump bundled in Triton's wheel. `python tests/kernels/_triton_sm90.py --all` builds every configuration the
autotuners keep (~3 min; run it on a new Triton version). Skipped where a GPU exists (the GPU tests compile and
run the real thing) or where this Triton lacks the ahead-of-time API.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "kernels", "_triton_sm90.py")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="GPU present: the GPU tests compile and run")

# Spill instructions (STL + LDL in the SASS) tolerated in one kernel: at 255 registers ptxas parks a few
# values outside the hot loop (seen: up to 16 in linear_logprobs' dz kernel with two streams); a config whose
# accumulators do not fit spills hundreds (the dz kernel at BT=128, BV=256, two streams: 1427 before it was pruned).
MAX_SPILL_INSTRUCTIONS = 24


@pytest.fixture(scope="module")
def builds():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")             # silence Triton 3.9's default-change notice
    try:
        import triton.compiler  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except ImportError as e:
        pytest.skip(f"no ahead-of-time compile API in this Triton: {e}")
    proc = subprocess.run([sys.executable, SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _label(r):
    return " ".join(f"{k}={v}" for k, v in r.items() if k not in ("ok", "error", "seconds") and not isinstance(v, bool)
                    and k in ("name", "dtype", "kl_mode", "streams", "rank", "rows", "BT", "BV", "BLOCK_M", "BLOCK_N",
                              "num_warps", "num_stages"))


def test_every_family_compiles(builds):
    names = {r["name"] for r in builds}
    assert names == {"logprobs_fwd", "logprobs_bwd", "linear_logprobs_fwd", "linear_logprobs_dz", "lora_gemm_fwd",
                     "lora_gemm_dx", "lora_wgrad"}
    failed = [f"{_label(r)}: {r['error']}" for r in builds if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert all(r["sm90"] for r in builds)


def test_tensor_cores_and_async_copies(builds):
    for r in builds:
        if r["name"].startswith("logprobs"):
            continue
        rows_tile = r.get("BLOCK_M", r.get("BT", 64))
        if rows_tile >= 64:                                   # a warpgroup's wgmma needs 64 rows
            assert r["wgmma"] > 0, f"{_label(r)}: dots should lower to wgmma on sm_90"
        else:
            assert r["mma_sync"] > 0, f"{_label(r)}: small-row dots should use mma.sync"
        assert r["cp_async"], f"{_label(r)}: K-loop loads should be pipelined (cp.async)"


def _sass(builds):
    if "regs" not in builds[0]:
        pytest.skip("Triton's wheel carries no cuobjdump here: registers and SASS not inspected")


def test_logprob_kernels_use_16_byte_accesses(builds):
    _sass(builds)
    for r in builds:
        if r["name"].startswith("logprobs"):
            assert r["ldg128"] > 0, f"{_label(r)}: the logits stream should be read with 16-byte loads"
        if r["name"] == "logprobs_bwd":
            assert r["stg128"] > 0, f"{_label(r)}: dlogits should be written with 16-byte stores"


def test_no_config_spills_heavily(builds):
    _sass(builds)
    heavy = [f"{_label(r)}: {r['spill_st']} STL + {r['spill_ld']} LDL, {r['stack']} B stack, {r['regs']} registers"
             for r in builds if r["spill_st"] + r["spill_ld"] > MAX_SPILL_INSTRUCTIONS]
    assert not heavy, "\n".join(heavy)
