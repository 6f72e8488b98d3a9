"""Benchmark: the fused multi-stream LoRA linear against what users run otherwise.

Cases (issue 2):
  actor_fwd_bwd     1 stream (actor adapter), forward + backward (dx, dA, dB; W frozen)
  base_actor        2 streams (base, actor), no grad              -- J-Hydra scoring / decoding
  base_actor_critic 3 streams (base, actor, critic), no grad      -- Hydra scoring / decoding
Providers:
  fused          ops.lora_linear, backend "triton": one launch for all streams
  cuda           ops.lora_linear, backend "cuda" (csrc; forward only) -- measured where the extension loads
  base           F.linear over all rows: the floor (fwd+bwd: forward + dx, W frozen)
  peft           unfused PyTorch LoRA as peft runs it: base GEMM over the batch, then per adapter sub-batch
                 lora_B(lora_A(x)) * scaling added in place (peft's mixed-batch forward)
  separate       one pass per stream (base GEMM [+ unfused LoRA] per stream): separate ref/actor/critic models
  fused_separate ops.lora_linear once per stream (isolates the gain of fusing the streams)
  compile        torch.compile of the peft function (dynamic rows; skipped where it fails)
  torch          ops.lora_linear, backend "torch" (the CPU path; CPU mode only)

GPU timing: median of triton.testing.do_bench (eager, includes launch overhead); no-grad cases are also timed
under a CUDA graph (do_bench_cudagraph), which removes Python/launch overhead for every provider alike and is
what decoding runs; ratios use the graph time where there is one. Ceilings are measured on the same device:
a device-to-device copy (HBM GB/s, read + write) and a large bf16 GEMM (TFLOP/s).

CPU mode (no GPU, or --cpu): wall-clock medians on tiny shapes, providers torch/base/peft/separate, so the
script can be smoke-tested anywhere. Triton under the interpreter is not timed (it measures Python).

  python bench/bench_lora_linear.py --quick                 # reduced sweep
  python bench/bench_lora_linear.py --out bench/results     # full sweep, JSON + Markdown
  python bench/bench_lora_linear.py --shapes 4096x4096 --ranks 64 --cases actor_fwd_bwd,base_actor \
      --case-rows actor_fwd_bwd=2048,8192 --case-rows base_actor=16,64 --out DIR   # bench/run_gpu.sh's pick

With --out the JSON and Markdown are rewritten after every measured row, so a run stopped by a time limit keeps
what it measured (meta.complete says whether the sweep finished). Targets carry an `id` and the issue they come
from (bench/gpu_call.py collects them into the GPU call's MET / MISSED table).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hydra_kernels import ops  # noqa: E402

CASES = {
    "actor_fwd_bwd": dict(layout=(0,), grad=True),
    "base_actor": dict(layout=(-1, 0), grad=False),
    "base_actor_critic": dict(layout=(-1, 0, 1), grad=False),
}
FULL = dict(shapes=[(4096, 4096), (4096, 11008)], ranks=[16, 64, 128], rows=[1, 16, 64, 256, 2048, 8192])
QUICK = dict(shapes=[(4096, 4096)], ranks=[16, 64], rows=[1, 64, 2048])
CPU_FULL = dict(shapes=[(256, 256), (256, 512)], ranks=[8, 16], rows=[1, 16, 64])
CPU_QUICK = dict(shapes=[(64, 96)], ranks=[8], rows=[1, 8])
GPU_PROVIDERS = ["fused", "cuda", "base", "peft", "separate", "fused_separate", "compile"]
CPU_PROVIDERS = ["torch", "base", "peft", "separate"]
SCALING = 2.0


# ------------------------------------------------------------------------------------------ problem
@dataclass
class Problem:
    K: int
    N: int
    r: int
    rows_per_stream: int
    case: str
    x: torch.Tensor
    W: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    dy: Optional[torch.Tensor]

    @property
    def layout(self):
        return CASES[self.case]["layout"]

    @property
    def grad(self):
        return CASES[self.case]["grad"]


def make_problem(K, N, r, rps, case, device, dtype) -> Problem:
    layout = CASES[case]["layout"]
    rows = rps * len(layout)
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(rows, K)
    W = rnd(N, K, scale=K ** -0.5)
    A = rnd(2, r, K, scale=K ** -0.5)
    B = rnd(2, N, r, scale=r ** -0.5)        # non-zero: the LoRA math is real work
    dy = rnd(rows, N) if CASES[case]["grad"] else None
    return Problem(K, N, r, rps, case, x, W, A, B, dy)


def stream_slices(p: Problem):
    return [slice(s * p.rows_per_stream, (s + 1) * p.rows_per_stream) for s in range(len(p.layout))]


# ---------------------------------------------------------------------------------------- providers
def _peft_forward(x, W, A, B, layout, rps):
    """peft's LoRA Linear with a mixed batch: base over all rows, then each adapter's sub-batch."""
    result = F.linear(x, W)
    for s, a in enumerate(layout):
        if a < 0:
            continue
        rows = slice(s * rps, (s + 1) * rps)
        sub = x[rows]
        result[rows] += F.linear(F.linear(sub, A[a]), B[a]) * SCALING
    return result


def _peft_forward_grad(x, W, A, B, layout, rps):
    # Out-of-place (autograd through the sliced in-place add would also work, but this is how a single-adapter
    # peft layer runs in training: result = base(x) + lora_B(lora_A(x)) * scaling).
    (a,) = layout
    return F.linear(x, W) + F.linear(F.linear(x, A[a]), B[a]) * SCALING


def _grad_closure(p: Problem, forward: Callable):
    x = p.x.detach().clone().requires_grad_(True)
    A = p.A.detach().clone().requires_grad_(True)
    B = p.B.detach().clone().requires_grad_(True)

    def fn():
        x.grad = A.grad = B.grad = None
        forward(x, A, B).backward(p.dy)
    return fn


def provider_fn(name: str, p: Problem) -> tuple[Optional[Callable], str]:
    """A zero-argument callable timing `name` on `p`, or (None, why not)."""
    layout, rps, W = p.layout, p.rows_per_stream, p.W
    if name in ("fused", "cuda", "torch"):
        backend = {"fused": "triton"}.get(name, name)
        if name == "cuda":
            if p.grad:
                return None, "forward-only kernel"
            try:
                from hydra_kernels.kernels.cuda import lora_linear_forward  # noqa: F401
            except Exception as e:                                      # not built / not written yet
                return None, f"unavailable: {type(e).__name__}: {e}"[:160]
        if p.grad:
            return _grad_closure(p, lambda x, A, B: ops.lora_linear(x, W, None, A, B, SCALING, layout,
                                                                     backend=backend)), ""
        return (lambda: ops.lora_linear(p.x, W, None, p.A, p.B, SCALING, layout, backend=backend)), ""
    if name == "base":
        if p.grad:
            return _grad_closure(p, lambda x, A, B: F.linear(x, W)), ""
        return (lambda: F.linear(p.x, W)), ""
    if name == "peft":
        if p.grad:
            return _grad_closure(p, lambda x, A, B: _peft_forward_grad(x, W, A, B, layout, rps)), ""
        return (lambda: _peft_forward(p.x, W, p.A, p.B, layout, rps)), ""
    if name == "separate":
        if len(layout) == 1:
            return None, "one stream: same as peft"
        slices = stream_slices(p)

        def sep():
            outs = []
            for s, a in enumerate(layout):
                xs = p.x[slices[s]]
                y = F.linear(xs, W)
                if a >= 0:
                    y = y + F.linear(F.linear(xs, p.A[a]), p.B[a]) * SCALING
                outs.append(y)
            return outs
        return sep, ""
    if name == "fused_separate":
        if len(layout) == 1:
            return None, "one stream: same as fused"
        slices = stream_slices(p)
        return (lambda: [ops.lora_linear(p.x[slices[s]], W, None, p.A, p.B, SCALING, (a,), backend="triton")
                         for s, a in enumerate(layout)]), ""
    if name == "compile":
        key = (p.grad, layout)
        compiled = _COMPILED.get(key)
        if compiled is None:
            base_fn = _peft_forward_grad if p.grad else _peft_forward
            compiled = _COMPILED[key] = torch.compile(base_fn, dynamic=True)
        if p.grad:
            fn = _grad_closure(p, lambda x, A, B: compiled(x, W, A, B, layout, rps))
        else:
            def fn():
                return compiled(p.x, W, p.A, p.B, layout, rps)
        try:
            fn()
            torch.cuda.synchronize() if p.x.is_cuda else None
        except Exception as e:                                          # report, do not hide
            return None, f"torch.compile failed: {type(e).__name__}: {e}"[:160]
        return fn, ""
    raise ValueError(f"provider: unknown {name!r}")


_COMPILED: dict = {}


# --------------------------------------------------------------------------------------------- timing
def time_gpu(fn, graph: bool) -> float:
    import triton.testing as tt
    fn()                                        # autotune / compile outside the timed region
    torch.cuda.synchronize()
    if graph:
        return float(tt.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return float(tt.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def time_cpu(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------- accounting
def flops(p: Problem) -> float:
    rows = p.rows_per_stream * len(p.layout)
    lora_rows = p.rows_per_stream * sum(a >= 0 for a in p.layout)
    if p.grad:    # fwd + dx GEMMs; LoRA: shrink, expand, dY·B, (dY·B)·A, dB, dA
        return 4.0 * rows * p.K * p.N + 6.0 * lora_rows * p.r * (p.K + p.N)
    return 2.0 * rows * p.K * p.N + 2.0 * lora_rows * p.r * (p.K + p.N)


def min_bytes(p: Problem) -> tuple[float, float]:
    """(weight bytes, compulsory bytes: W, x, y, the adapters used; backward reads W again (dY·W) and adds
    dy, dx, dA, dB)."""
    e = p.x.element_size()
    rows = p.rows_per_stream * len(p.layout)
    n_used = len({a for a in p.layout if a >= 0})
    wb = p.N * p.K * e * (2 if p.grad else 1)
    total = wb + rows * (p.K + p.N) * e + n_used * p.r * (p.K + p.N) * e
    if p.grad:
        total += rows * (p.K + p.N) * e + n_used * p.r * (p.K + p.N) * e
    return float(wb), float(total)


@dataclass
class Row:
    K: int
    N: int
    r: int
    rows_per_stream: int
    case: str
    provider: str
    ms: Optional[float] = None            # the time ratios use: CUDA graph where measured, else eager
    ms_eager: Optional[float] = None
    ms_graph: Optional[float] = None
    tflops: Optional[float] = None
    weight_gbps: Optional[float] = None
    bytes_gbps: Optional[float] = None
    note: str = ""


# ------------------------------------------------------------------------------------------- ceilings
def measure_ceilings(device) -> dict:
    import triton.testing as tt
    n = 1 << 29                                               # 1 GiB of bf16 each way
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = tt.do_bench(lambda: dst.copy_(src), warmup=10, rep=200, return_mode="median")
    copy_gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    del src, dst
    m = 8192
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    ms_mm = tt.do_bench(lambda: a @ b, warmup=10, rep=200, return_mode="median")
    gemm_tflops = 2 * m ** 3 / (ms_mm * 1e-3) / 1e12
    return {"hbm_copy_GBps": copy_gbps, "bf16_gemm_TFLOPs": gemm_tflops,
            "copy": "dst.copy_(src), 1 GiB bf16, bytes read + written",
            "gemm": f"torch.matmul bf16 {m}x{m}x{m}"}


# ------------------------------------------------------------------------------------------------ run
def parse_case_rows(items) -> dict:
    """--case-rows CASE=R1,R2 (repeatable) -> {case: [R1, R2]}: rows per stream for that case only."""
    out = {}
    for item in items or []:
        case, sep, rows = item.partition("=")
        if not sep or not rows:
            raise SystemExit(f"--case-rows: expected CASE=ROWS[,ROWS...], got {item!r}")
        try:
            out[case] = [int(v) for v in rows.split(",")]
        except ValueError:
            raise SystemExit(f"--case-rows: rows must be integers, got {item!r}") from None
    return out


def run(args, on_row: Optional[Callable[[dict], None]] = None) -> dict:
    """The sweep; on_row(result so far) is called after every measured row (main() writes the files there)."""
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    sweep = dict((QUICK if args.quick else FULL) if gpu else (CPU_QUICK if args.quick else CPU_FULL))
    if args.shapes:
        sweep["shapes"] = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    if args.ranks:
        sweep["ranks"] = [int(v) for v in args.ranks.split(",")]
    if args.rows:
        sweep["rows"] = [int(v) for v in args.rows.split(",")]
    cases = args.cases.split(",") if args.cases else list(CASES)
    case_rows = parse_case_rows(args.case_rows)
    unknown = sorted(set(case_rows) - set(CASES))
    if unknown:
        raise SystemExit(f"--case-rows: unknown case(s) {unknown}; choose from {list(CASES)}")
    providers = args.providers.split(",") if args.providers else (GPU_PROVIDERS if gpu else CPU_PROVIDERS)
    if args.no_compile and "compile" in providers:
        providers.remove("compile")
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu and args.threads:
        # Tiny CPU problems: one intra-op thread avoids OpenMP spin/oversubscription noise on shared machines.
        torch.set_num_threads(args.threads)

    meta = {
        "device": torch.cuda.get_device_name(device) if gpu else f"cpu ({platform.processor() or platform.machine()})",
        "mode": "gpu" if gpu else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": _triton_version(), "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "dtype": str(dtype).replace("torch.", ""), "scaling": SCALING, "sweep": sweep, "cases": cases,
        "case_rows": case_rows, "providers": providers, "complete": False,
        "timing": "triton.testing.do_bench median (eager) + do_bench_cudagraph median (no-grad)" if gpu
                  else f"wall clock median of {args.repeats}, {torch.get_num_threads()} thread(s)",
    }
    ceilings = measure_ceilings(device) if gpu else {}
    if gpu:
        print(f"ceilings: HBM copy {ceilings['hbm_copy_GBps']:.0f} GB/s, "
              f"bf16 GEMM {ceilings['bf16_gemm_TFLOPs']:.0f} TFLOP/s", flush=True)

    rows_out: list[Row] = []

    def result_so_far() -> dict:
        res = {"meta": meta, "ceilings": ceilings, "results": [asdict(r) for r in rows_out]}
        res["targets"] = evaluate_targets(rows_out, ceilings) if gpu else []
        return res

    all_rows = sorted({n for c in cases for n in case_rows.get(c, sweep["rows"])})
    for (K, N) in sweep["shapes"]:
        for r in sweep["ranks"]:
            for rps in all_rows:
                for case in cases:
                    if rps not in case_rows.get(case, sweep["rows"]):
                        continue
                    p = make_problem(K, N, r, rps, case, device, dtype)
                    wb, tb = min_bytes(p)
                    fl = flops(p)
                    for prov in providers:
                        row = Row(K, N, r, rps, case, prov)
                        fn, why = provider_fn(prov, p)
                        if fn is None:
                            row.note = why
                            rows_out.append(row)
                            continue
                        try:
                            if gpu:
                                row.ms_eager = time_gpu(fn, graph=False)
                                if not p.grad:
                                    row.ms_graph = time_gpu(fn, graph=True)
                            else:
                                row.ms_eager = time_cpu(fn, args.repeats)
                        except Exception as e:                      # keep the sweep going, say why
                            row.note = f"failed: {type(e).__name__}: {e}"[:160]
                            rows_out.append(row)
                            continue
                        row.ms = row.ms_graph if row.ms_graph is not None else row.ms_eager
                        row.tflops = fl / (row.ms * 1e-3) / 1e12
                        row.weight_gbps = wb / (row.ms * 1e-3) / 1e9
                        row.bytes_gbps = tb / (row.ms * 1e-3) / 1e9
                        rows_out.append(row)
                        print(f"{K}->{N} r={r:<3} rows/stream={rps:<5} {case:<17} {prov:<14} "
                              f"{row.ms:9.4f} ms  {row.tflops:7.2f} TFLOP/s  W {row.weight_gbps:7.1f} GB/s",
                              flush=True)
                        if on_row is not None:
                            on_row(result_so_far())
                    del p
    meta["complete"] = True
    result = result_so_far()
    result["autotune"] = _autotune_choices() if gpu else {}
    return result


def _triton_version():
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


def _autotune_choices() -> dict:
    """Which config the autotuner kept per key (for reading the results, and for pinning configs later)."""
    from hydra_kernels.kernels.triton import lora_linear as tk
    out = {}
    for name, tuner in (("gemm", tk._gemm_tuned), ("wgrad", tk._wgrad_tuned)):
        out[name] = {str(k): str(v) for k, v in getattr(tuner, "cache", {}).items()}
    return out


# ------------------------------------------------------------------------------------------- targets
def _index(rows: list[Row]):
    return {(r.K, r.N, r.r, r.rows_per_stream, r.case, r.provider): r for r in rows if r.ms is not None}


def evaluate_targets(rows: list[Row], ceilings: dict) -> list[dict]:
    """Issue 2's targets, bf16: (1) rows/stream ≥ 2048, actor fwd+bwd, rank 64: fused ≥ 1.3× faster than
    peft-style unfused and ≤ 1.10× the base GEMM; (2) rows/stream ≤ 64, 2 streams: fused ≥ 1.8× faster than
    separate passes and ≥ 75% of measured HBM bandwidth on the weight bytes."""
    idx = _index(rows)
    out = []

    def add(tid, issue, target, k, value, need, ok):
        out.append(dict(id=tid, issue=issue, target=target, key=k, value=value, need=need, ok=ok,
                        where=f"{k[0]}→{k[1]} r={k[2]} {k[3]} rows/stream {k[4]}"))

    for r in rows:
        if r.provider == "cuda" and r.ms is not None and r.case == "base_actor" and r.rows_per_stream <= 64:
            # Issue 4 (csrc/lora_linear_small.cu): ≥ 1.8× faster than two separate cuBLAS passes with unfused
            # LoRA, and ≥ 80% of measured HBM bandwidth on the weight bytes.
            k = (r.K, r.N, r.r, r.rows_per_stream, r.case)
            sep = idx.get(k + ("separate",))
            if sep:
                sp = sep.ms / r.ms
                add("lora.cuda_2stream_vs_separate", "issue 4", "cuda: 2 streams ≥1.8× vs separate passes", k, sp,
                    "≥ 1.8×", sp >= 1.8)
            if ceilings.get("hbm_copy_GBps"):
                frac = r.weight_gbps / ceilings["hbm_copy_GBps"]
                add("lora.cuda_2stream_hbm", "issue 4", "cuda: 2 streams ≥80% HBM on weight bytes", k, frac,
                    "≥ 0.80 of HBM", frac >= 0.80)
        if r.provider != "fused" or r.ms is None:
            continue
        k = (r.K, r.N, r.r, r.rows_per_stream, r.case)
        if r.case == "actor_fwd_bwd" and r.rows_per_stream >= 2048 and r.r == 64:
            peft, base = idx.get(k + ("peft",)), idx.get(k + ("base",))
            if peft:
                sp = peft.ms / r.ms
                add("lora.fwdbwd_vs_peft", "issue 2", "fwd+bwd ≥1.3× vs unfused", k, sp, "≥ 1.3×", sp >= 1.3)
            if base:
                rat = r.ms / base.ms
                add("lora.fwdbwd_vs_base", "issue 2", "fwd+bwd ≤1.10× base GEMM", k, rat, "≤ 1.10×", rat <= 1.10)
        if r.case == "base_actor" and r.rows_per_stream <= 64:
            sep = idx.get(k + ("separate",))
            if sep:
                sp = sep.ms / r.ms
                add("lora.2stream_vs_separate", "issue 2", "2 streams ≥1.8× vs separate passes", k, sp, "≥ 1.8×",
                    sp >= 1.8)
            if ceilings.get("hbm_copy_GBps"):
                frac = r.weight_gbps / ceilings["hbm_copy_GBps"]
                add("lora.2stream_hbm", "issue 2", "2 streams ≥75% HBM on weight bytes", k, frac, "≥ 0.75 of HBM",
                    frac >= 0.75)
    return out


# ------------------------------------------------------------------------------------------ reporting
def markdown(result: dict) -> str:
    meta, ceil = result["meta"], result["ceilings"]
    rows = [Row(**d) for d in result["results"]]
    idx = _index(rows)
    providers = [p for p in meta["providers"] if any(r.provider == p and r.ms is not None for r in rows)]
    lead = "fused" if "fused" in providers else ("torch" if "torch" in providers else providers[0])
    lines = [f"# lora_linear benchmark — {meta['device']}", "",
             f"{meta['date']} · torch {meta['torch']} · triton {meta['triton']} · CUDA {meta['cuda']} · "
             f"{meta['dtype']} · {meta['timing']}", ""]
    if not meta.get("complete", True):
        lines += ["**Partial results: the run stopped before the sweep finished.**", ""]
    if ceil:
        lines += [f"Measured ceilings: HBM copy **{ceil['hbm_copy_GBps']:.0f} GB/s**, bf16 GEMM "
                  f"**{ceil['bf16_gemm_TFLOPs']:.0f} TFLOP/s**.", ""]
    for case in meta["cases"]:
        lines += [f"## {case} (layout {CASES[case]['layout']})", "",
                  "| K→N | r | rows/stream | " + " | ".join(f"{p} ms" for p in providers) +
                  f" | {lead} TFLOP/s | {lead} W GB/s" + (" (% HBM)" if ceil else "") + " | speedups of " + lead + " |",
                  "|" + "---|" * (len(providers) + 6)]
        keys = sorted({(r.K, r.N, r.r, r.rows_per_stream) for r in rows if r.case == case})
        for (K, N, rr, rps) in keys:
            cells = []
            for p in providers:
                x = idx.get((K, N, rr, rps, case, p))
                cells.append(f"{x.ms:.4f}" if x else "—")
            f = idx.get((K, N, rr, rps, case, lead))
            tf = f"{f.tflops:.1f}" if f else "—"
            gb = (f"{f.weight_gbps:.0f}" + (f" ({100 * f.weight_gbps / ceil['hbm_copy_GBps']:.0f}%)" if ceil else "")) \
                if f else "—"
            sp = []
            for p in providers:
                x = idx.get((K, N, rr, rps, case, p))
                if f and x and p != lead:
                    sp.append(f"{p} {x.ms / f.ms:.2f}×")
            lines.append(f"| {K}→{N} | {rr} | {rps} | " + " | ".join(cells) + f" | {tf} | {gb} | {', '.join(sp)} |")
        lines.append("")
    notes = sorted({(r.provider, r.note) for r in rows if r.note})
    if notes:
        lines += ["Not measured:", ""] + [f"- {p}: {n}" for p, n in notes] + [""]
    if result.get("targets"):
        lines += ["## Targets (issue 2; `cuda:` rows issue 4)", "", "| target | K, N, r, rows/stream, case | value | met |", "|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['target']} | {t['key']} | {t['value']:.3f} | {'yes' if t['ok'] else 'NO'} |")
        lines.append("")
    lines += ["Speedup = other provider's ms / lead provider's ms (>1: the lead is faster). "
              "GPU times for no-grad cases are CUDA-graph medians; fwd+bwd are eager medians.", ""]
    return "\n".join(lines)


def write_outputs(result: dict, out_dir: str, tag: str = "") -> tuple[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    dev = "".join(c if c.isalnum() else "_" for c in result["meta"]["device"]).strip("_").lower()[:40]
    stamp = result["meta"]["date"][:10]
    base = os.path.join(out_dir, f"lora_linear_{dev}_{stamp}{('_' + tag) if tag else ''}")
    # Written aside and renamed: a run killed mid-write (a time limit) leaves the previous complete file.
    for path, text in ((base + ".json", json.dumps(result, indent=1, default=str)), (base + ".md", markdown(result))):
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    return base + ".json", base + ".md"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="reduced sweep")
    ap.add_argument("--cpu", action="store_true", help="CPU mode even where a GPU exists")
    ap.add_argument("--out", default=None, help="directory for the JSON + Markdown results (e.g. bench/results)")
    ap.add_argument("--tag", default="", help="suffix for the output file names (split runs)")
    ap.add_argument("--shapes", default=None, help="comma list of KxN, e.g. 4096x4096,4096x11008")
    ap.add_argument("--ranks", default=None, help="comma list, e.g. 16,64,128")
    ap.add_argument("--rows", default=None, help="rows per stream, comma list")
    ap.add_argument("--case-rows", action="append", metavar="CASE=ROWS",
                    help="rows per stream for one case only, e.g. base_actor=16,64 (repeatable; overrides --rows)")
    ap.add_argument("--cases", default=None, help=f"comma list of {list(CASES)}")
    ap.add_argument("--providers", default=None, help=f"comma list of {GPU_PROVIDERS + ['torch']}")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--repeats", type=int, default=20, help="CPU mode: timed repetitions")
    ap.add_argument("--threads", type=int, default=1, help="CPU mode: torch intra-op threads (0 = leave as is)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    threads = torch.get_num_threads()
    on_row = (lambda res: write_outputs(res, args.out, args.tag)) if args.out else None
    try:
        result = run(args, on_row)
    finally:
        torch.set_num_threads(threads)            # main() may be called in-process (tests)
    if args.out:
        js, md = write_outputs(result, args.out, args.tag)
        print(f"wrote {js} and {md}")
    else:
        print(markdown(result))
    bad = [t for t in result["targets"] if not t["ok"]]
    if bad:
        print(f"{len(bad)} target(s) not met (see the Targets table)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
