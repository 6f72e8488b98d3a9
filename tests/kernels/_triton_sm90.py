"""Ahead-of-time sm_90 builds of every Triton kernel at the launch configurations the GPU would use.

Run as a script, TRITON_INTERPRET unset: `python tests/kernels/_triton_sm90.py [--all] [--markdown FILE]`
prints one JSON record per build (and writes them as a Markdown table). The interpreter that the CPU tests use
runs a kernel's Python, not Triton's compiler, so a construct the compiler rejects, a config that spills
registers, or loads that lost their 16-byte width would only show on a GPU; this compiles each kernel with
Triton's own pipeline for GPUTarget("cuda", 90, 32) and reads the cubin with the cuobjdump bundled in Triton's
wheel (registers, local memory = spills, SASS).

Default: the riskiest configuration of each kernel family (CI). --all: every configuration the autotuners'
pruners keep, at ranks 16 and 64 and at 1 and 2 streams (minutes; for a new Triton version).
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hydra_kernels.kernels.triton import linear_logprobs as llp
from hydra_kernels.kernels.triton import logprobs as lp
from hydra_kernels.kernels.triton import lora_linear as tk

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
TARGET = GPUTarget("cuda", 90, 32)


def _jit(fn):
    return fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([os.path.join(BIN, "cuobjdump"), *flags, path], capture_output=True, text=True,
                              check=True).stdout


def build(name, fn, types, consts, divisible, num_warps, num_stages, **params):
    """Compile fn for sm_90. types: pointer/int types by argument name (others i32); divisible: arguments a
    real launch would see as multiples of 16 (Triton specialises those)."""
    fn = _jit(fn)
    t0 = time.time()
    sig = {n: ("constexpr" if n in consts else types.get(n, "i32")) for n in fn.arg_names}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in divisible if n not in consts}
    rec = dict(name=name, num_warps=num_warps, num_stages=num_stages, **params)
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=TARGET,
                           options=dict(num_warps=num_warps, num_stages=num_stages))
    except Exception as e:  # the compiler's message is the finding
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[-1500:]}")
        return rec
    ptx = k.asm["ptx"]
    rec.update(ok=True, seconds=round(time.time() - t0, 1), sm90=".target sm_90" in ptx,
               wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
               mma_sync=len(re.findall(r"mma\.sync", ptx)), cp_async="cp.async" in ptx)
    if os.path.exists(os.path.join(BIN, "cuobjdump")):
        res = _cuobjdump(k.asm["cubin"], "-res-usage")
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res)
        rec.update(regs=int(m.group(1)), stack=int(m.group(2)), local=int(m.group(4)))
        sass = _cuobjdump(k.asm["cubin"], "-sass")
        # Register spills are local-memory stores/loads (STL/LDL) in the SASS.
        rec.update(spill_st=len(re.findall(r"\bSTL\b", sass)), spill_ld=len(re.findall(r"\bLDL\b", sass)),
                   ldg128=len(re.findall(r"\bLDG\.E\.128\b", sass)), stg128=len(re.findall(r"\bSTG\.E\.128\b", sass)),
                   ldgsts=len(re.findall(r"\bLDGSTS\b", sass)) + len(re.findall(r"\bUTMALDG\b", sass)))
    return rec


def _ptrs_and(fn, *names):
    return [n for n in _jit(fn).arg_names if n.endswith("_ptr") or n in names]


# ------------------------------------------------------------------------------------------------- log-probs
def logprob_cases(full: bool):
    fwd, bwd = lp._logprobs_fwd_kernel, lp._logprobs_bwd_kernel
    # A vocabulary that is a multiple of 16 (151936, 32000, 128256): row strides specialise as divisible.
    div_f = _ptrs_and(fwd, "sx_b", "sx_t", "sr_b", "sr_t", "V")
    div_b = _ptrs_and(bwd, "sx_b", "sx_t", "sr_b", "sr_t", "V")
    dtypes = ("bf16", "fp32") if full else ("bf16",)
    modes = range(5) if full else (0, 4)
    for dt in dtypes:
        t = dict(x_ptr=f"*{dt}", r_ptr=f"*{dt}", dx_ptr=f"*{dt}", tgt_ptr="*i64", ignore_index="i32",
                 **{p: "*fp32" for p in ("logp_ptr", "rlogp_ptr", "kl_ptr", "ent_ptr", "stats_ptr", "glogp_ptr",
                                         "gkl_ptr", "gent_ptr")})
        for bv in ((4096, 1024) if full else (4096,)):
            bv_, nw = lp._launch_cfg(bv, bv, None, False)
            for mode in modes:
                c = dict(INV_T=0.7, KL_MODE=mode, BLOCK_V=bv_)
                yield build("logprobs_fwd", fwd, t, c, div_f, nw, 3, dtype=dt, kl_mode=mode, block_v=bv_)
                g = dict(HAS_GLOGP=True, HAS_GKL=mode > 0, HAS_GENT=mode > 0)
                yield build("logprobs_bwd", bwd, t, dict(c, **g), div_b, nw, 3, dtype=dt, kl_mode=mode,
                            block_v=bv_)


# -------------------------------------------------------------------------------------- fused LM-head log-probs
def _largest_tile(configs):
    """The config with the largest [BT, BV] accumulator per stream and the most pipeline stages."""
    return max(configs, key=lambda c: (c.kwargs["BT"] * c.kwargs["BV"] / c.num_warps, c.num_stages))


def linear_logprob_cases(full: bool):
    fwd, dz = llp._fwd_kernel, llp._dz_kernel
    t = dict(w_ptr="*bf16", b_ptr="*bf16", tgt_ptr="*i64", inv_t_ptr="*fp32", part_ptr="*fp32",
             klpart_ptr="*fp32", **{f"h{i}_ptr": "*bf16" for i in range(4)})
    div = _ptrs_and(fwd, "D", "stride_ht", "stride_wv", "split_cols")
    for S, kl_full in ((1, False), (2, True)) if full else ((2, True),):
        configs = llp._prune_fwd(llp._FWD_CONFIGS, {}, S=S)
        for c in (configs if full else [_largest_tile(configs)]):
            consts = dict(S=S, KL_FULL=kl_full, FP32=False, EVEN_D=True, HAS_BIAS=False, **c.kwargs)
            yield build("linear_logprobs_fwd", fwd, t, consts,
                        div, c.num_warps, c.num_stages, streams=S, **c.kwargs)
    t = dict(ha_ptr="*bf16", hb_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", tgt_ptr="*i64", inv_t_ptr="*fp32",
             rowa_ptr="*fp32", rowb_ptr="*fp32", klrow_ptr="*fp32", dza_ptr="*bf16", dzb_ptr="*bf16")
    div = _ptrs_and(dz, "D", "stride_ht", "stride_wv", "stride_dz", "v_begin", "n_cols")
    for NS, kl in ((1, False), (2, True)) if full else ((2, True),):
        configs = llp._prune_dz(llp._DZ_CONFIGS, {}, NS=NS)
        for c in (configs if full else [_largest_tile(configs)]):
            yield build("linear_logprobs_dz", dz, t, dict(NS=NS, KL_GRAD=kl, WRITE_B=NS == 2, FP32=False,
                                                          EVEN_D=True, HAS_BIAS=False, **c.kwargs),
                        div, c.num_warps, c.num_stages, streams=NS, **c.kwargs)


# ---------------------------------------------------------------------------------------------- LoRA linear
def _largest(configs):
    """The config with the most accumulator registers per thread (the one most likely to spill)."""
    return max(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]) / c.num_warps
               + 16 * (c.kwargs["N_GROUP"] > 1))


def lora_cases(full: bool):
    gemm, wgrad = tk._lora_gemm_kernel, tk._lora_wgrad_kernel
    div = _ptrs_and(gemm, "N", "K", "R", *[n for n in gemm.arg_names if n.startswith("stride")])
    # (dtype, rank, rows per stream): the row count picks the autotuner's class (small / mid / large / fp32).
    shapes = ([("bf16", r, rows) for r in (16, 64) for rows in (8, 64, 512)] + [("fp32", 16, 8)]) if full \
        else [("bf16", 64, 512), ("bf16", 16, 8)]
    for dt, rank, rows in shapes:
        torch_dtype = torch.float32 if dt == "fp32" else torch.bfloat16
        t = dict(x_ptr=f"*{dt}", w_ptr=f"*{dt}", bias_ptr=f"*{dt}", a_ptr=f"*{dt}", b_ptr=f"*{dt}",
                 y_ptr=f"*{dt}", xa_ptr="*fp32", adapters_ptr="*i32", scale_ptr="*fp32")
        upcast, dot_prec, epi_prec = tk._precisions(torch_dtype, False)
        r_pad = tk._r_pad(rank)
        pruned = tk._prune_gemm(tk._GEMM_CONFIGS, {"x_ptr": SimpleNamespace(dtype=torch_dtype)}, R_PAD=r_pad,
                                ROWS_BUCKET=tk._rows_bucket(rows), COMPUTE_Y=True)
        common = dict(UPCAST=upcast, DOT_PREC=dot_prec, EPI_PREC=epi_prec, R_PAD=r_pad)
        for c in pruned if full else [_largest(pruned)]:
            consts = dict(common, HAS_BIAS=True, COMPUTE_Y=True, stride_xk=1, stride_wk=1, stride_ak=1,
                          stride_br=1, stride_yn=1, **c.kwargs)
            yield build("lora_gemm_fwd", gemm, t, consts, div, c.num_warps, c.num_stages, dtype=dt, rank=rank,
                        rows=rows, **c.kwargs)
        # dx: the same kernel through transposed views (W as [K, N], B as the shrink, A as the expand).
        c = _largest(pruned)
        consts = dict(common, HAS_BIAS=False, COMPUTE_Y=True, stride_xk=1, stride_wn=1, stride_ar=1, stride_bn=1,
                      stride_yn=1, **c.kwargs)
        yield build("lora_gemm_dx", gemm, t, consts, div, c.num_warps, c.num_stages, dtype=dt, rank=rank, rows=rows,
                    **c.kwargs)
    t = dict(g_ptr="*bf16", q_ptr="*fp32", part_ptr="*fp32", scale_ptr="*fp32", lora_streams_ptr="*i32")
    div = _ptrs_and(wgrad, "BIG", "R", *[n for n in wgrad.arg_names if n.startswith("stride")])
    for rank in (16, 64) if full else (64,):
        r_pad = tk._r_pad(rank)
        for c in tk._prune_wgrad(tk._WGRAD_CONFIGS, {}, R_PAD=r_pad)[: None if full else 1]:
            consts = dict(UPCAST=False, DOT_PREC="tf32", R_PAD=r_pad, stride_gb=1, stride_qr=1, **c.kwargs)
            yield build("lora_wgrad", wgrad, t, consts, div, c.num_warps, c.num_stages, rank=rank, **c.kwargs)


def markdown(records) -> str:
    """The records as a Markdown table (one row per build) with the versions they were built with."""
    keys = ("dtype", "kl_mode", "block_v", "streams", "rank", "rows", "BT", "BV", "BK", "BLOCK_M", "BLOCK_N",
            "BLOCK_K", "N_GROUP", "BLOCK_BIG", "BLOCK_ROWS")
    lines = [f"sm_90 ahead-of-time builds: triton {triton.__version__}, torch {torch.__version__}, "
             f"{len(records)} builds, {sum(not r['ok'] for r in records)} failed", "",
             "| kernel | config | warps | stages | regs | spill STL+LDL | wgmma | mma.sync | LDG.128 | s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        cfg = " ".join(f"{k}={r[k]}" for k in keys if k in r)
        if not r["ok"]:
            lines.append(f"| {r['name']} | {cfg} | {r['num_warps']} | {r['num_stages']} | FAILED | | | | | |")
            continue
        spill = f"{r['spill_st'] + r['spill_ld']}" if "spill_st" in r else "-"
        lines.append(f"| {r['name']} | {cfg} | {r['num_warps']} | {r['num_stages']} | {r.get('regs', '-')} | "
                     f"{spill} | {r['wgmma']} | {r['mma_sync']} | {r.get('ldg128', '-')} | {r['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv):
    full = "--all" in argv
    md_path = argv[argv.index("--markdown") + 1] if "--markdown" in argv else None
    records = []
    for gen in (logprob_cases, linear_logprob_cases, lora_cases):
        for rec in gen(full):
            records.append(rec)
            print(json.dumps(rec), flush=True)
    if md_path:
        with open(md_path, "w") as f:
            f.write(markdown(records))


if __name__ == "__main__":
    main(sys.argv[1:])
