"""The lora_linear kernels compile for an H100/H200 (sm_90) on a machine without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler: a construct the compiler rejects (or one
that silently stops using wgmma or pipelined loads) would only show up on the GPU. Here Triton compiles the
most involved variants ahead of time for sm_90 with its bundled ptxas, in a subprocess (the test session
has TRITON_INTERPRET=1, under which @triton.jit gives interpreter objects). Skipped where a GPU exists (the
GPU tests compile and run the real thing) or where this Triton lacks the ahead-of-time API used here.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="GPU present: the GPU tests compile and run")

SCRIPT = r'''
import json, re, sys
import triton
try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print(json.dumps({"skip": str(e)})); sys.exit(0)
from hydra_kernels.kernels.triton import lora_linear as tk

def build(fn, types, consts, divisible, num_warps, num_stages):
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible if n not in consts}
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    ptx = k.asm["ptx"]
    return {"sm90": ".target sm_90" in ptx, "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "cp_async": "cp.async" in ptx}

out = {}
fn = tk._lora_gemm_kernel
types = dict(x_ptr="*bf16", w_ptr="*bf16", bias_ptr="*bf16", a_ptr="*bf16", b_ptr="*bf16", y_ptr="*bf16",
             xa_ptr="*fp32", adapters_ptr="*i32", scale_ptr="*fp32")
div = [n for n in fn.arg_names if n.endswith("_ptr") or n.startswith("stride")] + ["N", "K", "R"]
# Forward, large-row config with N_GROUP=2 (shrink reuse) at rank 64; unit strides specialised as Triton does.
out["forward"] = build(fn, types, dict(HAS_BIAS=True, COMPUTE_Y=True, UPCAST=False, DOT_PREC="tf32",
                       EPI_PREC="tf32", R_PAD=64, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, N_GROUP=2,
                       stride_xk=1, stride_wk=1, stride_ak=1, stride_br=1, stride_yn=1), div, 8, 4)
# dx: the same kernel through transposed views (W as [K, N], B as the shrink, A as the expand).
out["dx"] = build(fn, types, dict(HAS_BIAS=False, COMPUTE_Y=True, UPCAST=False, DOT_PREC="tf32",
                  EPI_PREC="tf32", R_PAD=64, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, N_GROUP=1,
                  stride_xk=1, stride_wn=1, stride_ar=1, stride_bn=1, stride_yn=1), div, 8, 4)
wg = tk._lora_wgrad_kernel
wtypes = dict(g_ptr="*bf16", q_ptr="*fp32", part_ptr="*fp32", scale_ptr="*fp32", lora_streams_ptr="*i32")
wdiv = [n for n in wg.arg_names if n.endswith("_ptr") or n.startswith("stride")] + ["BIG", "R"]
out["wgrad"] = build(wg, wtypes, dict(UPCAST=False, DOT_PREC="tf32", R_PAD=64, BLOCK_BIG=128, BLOCK_ROWS=32,
                     stride_gb=1, stride_qr=1), wdiv, 4, 3)
print(json.dumps(out))
'''


def test_kernels_compile_for_sm90_with_wgmma_and_async_loads():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")             # silence Triton 3.9's default-change notice
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in res:
        pytest.skip(f"no ahead-of-time compile API in this Triton: {res['skip']}")
    for name, r in res.items():
        assert r["sm90"], name
        assert r["wgmma"] > 0, f"{name}: dots should lower to wgmma on sm_90"
        assert r["cp_async"], f"{name}: K-loop loads should be pipelined (cp.async)"
