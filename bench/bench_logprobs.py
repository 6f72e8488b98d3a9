"""Benchmarks for the log-prob ops: per-token log-probs / KL / entropy, from stored logits and LM-head fused.

    python bench/bench_logprobs.py                      # everything, GPU, writes bench/results/
    python bench/bench_logprobs.py --section logits --quick
    python bench/bench_logprobs.py --smoke --out /tmp/x # tiny CPU run (used by tests/ops/test_logprobs.py)
    python bench/bench_logprobs.py --section logits --tune   # sweep block_v x num_warps of the Triton kernel

Sections
--------
`logits`  (ops.token_logprobs / ops.logprobs_and_kl from stored logits). Cases: tokens x vocab, bf16, 1 model
          (log-probs) and 2 models (actor + reference: log-probs, k3 KL, entropy), forward and forward+backward.
          Impls: ours; `eager` = fp32 log_softmax + gather (+ entropy, k3); `chunked` = row-chunked fp32
          logsumexp minus the gathered logit (TRL's selective_log_softmax, chunked by rows); `compile` =
          torch.compile of the eager code; `liger` = Liger-Kernel's fused_selective_log_softmax (forward
          only, no entropy) when it imports; `cuda` = the same op on the csrc/ CUDA kernel (GPU only). Bytes = the minimum traffic (each logit tensor read once forward;
          backward reads the actor logits again and writes dlogits), so GB/s compares directly with the measured
          HBM copy bandwidth.
`linear`  (ops.linear_logprobs, the LM head fused) - not in this file yet; see "Adding a section".

Adding a section (for the LM-head engineer)
-------------------------------------------
Write `def bench_linear(args, env) -> list[dict]` and register it in SECTIONS. `env` gives you:
  env["device"] (torch.device), env["time"](fn) -> median ms (triton.testing.do_bench on GPU, wall clock on
  CPU), env["peak"](fn) -> extra peak GiB allocated while fn runs (None on CPU), env["hbm_gbps"], env["smoke"].
Return one dict per (case, impl): required keys `case` (a string naming the shape/mode), `impl`, `ms`
(None when it could not run, with `note` saying why); optional `bytes` (-> GB/s, % of HBM), `flops`
(-> TFLOP/s), `peak_gib`, `ratio_ref` (the impl other impls are compared to in the same case; default
"eager"), and any extra columns (they go to JSON; pass `extra_cols=[...]` to `write_results` to show
them in the table). `write_results` adds the derived columns, writes `<out>/logprobs_<section>_<device>_<date>
.json` (device, versions, date, raw numbers) and a Markdown table next to it. Add the section's argument
defaults (shapes) in `parse_args`; `--quick` and `--smoke` should shrink them. Call `env["progress"](rows)`
after each row: main() rewrites the files then, so a run stopped by a time limit keeps what it measured
(`complete` in the JSON says whether the section finished). A section's targets: a function in
SECTION_TARGETS(rows, env) -> [{id, issue, target, where, value, need, ok}], written to the JSON's `targets`.

Target of `logits` (issue 4): the log-prob kernels (ours = Triton, cuda = csrc) move ≥ 85% of the measured HBM
copy bandwidth, on every case that moves at least 1 GiB (smaller ones measure launch overhead).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hydra_kernels import ops  # noqa: E402

GIB = 1 << 30


# ------------------------------------------------------------------------------------------ environment
def _cpu_time(fn, reps=5):
    fn()                                            # warm-up (allocations, lazy imports)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def _gpu_time(fn):
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median"))


def _gpu_peak(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GIB


def measure_hbm_gbps(device) -> float | None:
    """Device-to-device copy bandwidth (read + write bytes / time) on a 2 GiB buffer."""
    if device.type != "cuda":
        return None
    src = torch.empty(GIB, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = _gpu_time(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * GIB / (ms * 1e-3) / 1e9


def make_env(args):
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    gpu = device.type == "cuda"
    env = {
        "device": device,
        "smoke": args.smoke,
        "time": _gpu_time if gpu else _cpu_time,
        "peak": _gpu_peak if gpu else (lambda fn: None),
        "hbm_gbps": measure_hbm_gbps(device),
    }
    return env


def versions():
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    try:
        import liger_kernel  # noqa: F401
        from importlib.metadata import version
        v["liger_kernel"] = version("liger-kernel")
    except Exception:
        v["liger_kernel"] = None
    return v


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


# ------------------------------------------------------------------------------------ shared results writer
def _fmt(v, nd=3):
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.{nd}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def derive(rows, env):
    """Add GB/s, % of HBM, TFLOP/s and speed ratios (vs the case's ratio_ref impl) to every row."""
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], {})[r["impl"]] = r
    for r in rows:
        ms = r.get("ms")
        ok = ms is not None and ms > 0
        if r.get("bytes") and ok:
            r["gbps"] = r["bytes"] / (ms * 1e-3) / 1e9
            if env.get("hbm_gbps"):
                r["pct_hbm"] = 100.0 * r["gbps"] / env["hbm_gbps"]
        if r.get("flops") and ok:
            r["tflops"] = r["flops"] / (ms * 1e-3) / 1e12
        ref = by_case[r["case"]].get(r.get("ratio_ref", "eager"))
        if ref is not None and ok and ref.get("ms"):
            r["speedup_vs_ref"] = ref["ms"] / ms
    return rows


def _write_atomic(path: pathlib.Path, text: str) -> None:
    """Written aside and renamed: a run killed mid-write leaves the previous complete file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(section, rows, env, args, out_dir, extra_cols=(), now=None, complete=True, targets=None):
    """JSON (device, versions, date, raw rows, targets) + a Markdown table, both under out_dir. `now` fixes the
    file names (pass the same one to rewrite a run's files as it goes); `targets` defaults to the section's
    SECTION_TARGETS. Returns the paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    dev = env["device"]
    name = device_name(dev)
    slug = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:40]
    stem = f"logprobs_{section}_{slug}_{now.strftime('%Y%m%d-%H%M%S')}"
    derive(rows, env)
    if targets is None:
        targets = SECTION_TARGETS[section](rows, env) if section in SECTION_TARGETS else []
    meta = {
        "bench": "bench/bench_logprobs.py", "section": section, "date": now.isoformat(timespec="seconds"),
        "device": name, "device_type": dev.type, "versions": versions(), "hbm_copy_gbps": env.get("hbm_gbps"),
        "complete": complete, "args": {k: v for k, v in vars(args).items()}, "results": rows, "targets": targets,
    }
    jpath = out / f"{stem}.json"
    _write_atomic(jpath, json.dumps(meta, indent=1, default=str))
    cols = ["case", "impl", "ms", "gbps", "pct_hbm", "tflops", "peak_gib", "speedup_vs_ref", *extra_cols, "note"]
    cols = [c for c in cols if any(r.get(c) is not None for r in rows) or c in ("case", "impl", "ms")]
    head = {"ms": "median ms", "gbps": "GB/s", "pct_hbm": "% HBM", "tflops": "TFLOP/s", "peak_gib": "peak GiB",
            "speedup_vs_ref": "x vs ref"}
    lines = [
        f"# bench_logprobs: {section}", "",
        f"- device: {name}; versions: {json.dumps(meta['versions'])}",
        f"- date (UTC): {meta['date']}; HBM copy bandwidth: {_fmt(env.get('hbm_gbps'))} GB/s",
        "- `x vs ref`: the case's reference impl time / this impl's time (ref = eager unless noted)", "",
        "| " + " | ".join(head.get(c, c) for c in cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    if not complete:
        lines += ["", "**Partial results: the run stopped before the section finished.**"]
    if targets:
        lines += ["", "## Targets", "", "| target | issue | where | value | need | met |", "|---|---|---|---|---|---|"]
        for t in targets:
            lines.append(f"| {t['target']} | {t['issue']} | {t['where']} | {_fmt(t['value'])} | {t['need']} | "
                         f"{'MET' if t['ok'] else 'MISSED'} |")
    mpath = out / f"{stem}.md"
    _write_atomic(mpath, "\n".join(lines) + "\n")
    return jpath, mpath


# ------------------------------------------------------------------------------------- section: logits
def _eager_1(x, t, T):
    return torch.log_softmax(x.float() / T, dim=-1).gather(-1, t.unsqueeze(-1)).squeeze(-1)


def _eager_2(x, r, t, T):
    lp_all = torch.log_softmax(x.float() / T, dim=-1)
    rp_all = torch.log_softmax(r.float() / T, dim=-1)
    lp = lp_all.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    rlp = rp_all.gather(-1, t.unsqueeze(-1)).squeeze(-1)
    ent = -(lp_all.exp() * lp_all).sum(-1)
    d = rlp - lp
    return lp, rlp, torch.expm1(d) - d, ent


def _chunks(n, rows):
    return [(i, min(n, i + rows)) for i in range(0, n, rows)]


def _chunked_1(x, t, T, rows=1024):
    """Row-chunked fp32 logsumexp minus the gathered target logit (TRL selective_log_softmax style)."""
    V = x.shape[-1]
    x2, t2 = x.reshape(-1, V), t.reshape(-1)
    out = []
    for a, b in _chunks(x2.shape[0], rows):
        z = x2[a:b].float() / T
        out.append(z.gather(-1, t2[a:b, None]).squeeze(-1) - torch.logsumexp(z, -1))
    return torch.cat(out).view(t.shape)


def _chunked_2(x, r, t, T, rows=1024):
    V = x.shape[-1]
    x2, r2, t2 = x.reshape(-1, V), r.reshape(-1, V), t.reshape(-1)
    outs = [[], [], [], []]
    for a, b in _chunks(x2.shape[0], rows):
        lp_all = torch.log_softmax(x2[a:b].float() / T, -1)
        rlp = torch.log_softmax(r2[a:b].float() / T, -1).gather(-1, t2[a:b, None]).squeeze(-1)
        lp = lp_all.gather(-1, t2[a:b, None]).squeeze(-1)
        d = rlp - lp
        for o, v in zip(outs, (lp, rlp, torch.expm1(d) - d, -(lp_all.exp() * lp_all).sum(-1))):
            o.append(v)
    return tuple(torch.cat(o).view(t.shape) for o in outs)


def _liger():
    try:
        from liger_kernel.ops.grpo_loss import fused_selective_log_softmax
        return fused_selective_log_softmax
    except Exception:
        return None


def _loss(outs, w):
    if isinstance(outs, torch.Tensor):
        outs = (outs,)
    picks = [outs[0]] if len(outs) == 1 else [outs[0], outs[2], outs[3]]
    return sum((o * wi).sum() for o, wi in zip(picks, w))


def bench_logits(args, env):
    dev = env["device"]
    T = 1.0
    rows_out = []
    liger = _liger() if dev.type == "cuda" else None
    seq = 8 if env["smoke"] else 512                      # tokens are laid out as [tokens/seq, seq + 1, V]
    for V in args.vocab:
        for N in args.tokens:
            B = max(1, N // seq)
            L = N // B
            # logits for L+1 positions, the op reads the [:, :-1] slice in place (the RLHF layout).
            try:
                full = [torch.randn(B, L + 1, V, device=dev, dtype=torch.bfloat16) * 3 for _ in range(2)]
            except torch.OutOfMemoryError:
                rows_out.append(dict(case=f"N={N} V={V}", impl="-", ms=None, note="OOM allocating inputs"))
                continue
            x, r = full[0][:, :-1], full[1][:, :-1]
            t = torch.randint(0, V, (B, L), device=dev)
            w = [torch.randn(B, L, device=dev) for _ in range(3)]
            nbytes = B * L * V * 2
            for models in args.models:
                for mode in args.modes:
                    case = f"{mode} models={models} N={B * L} V={V}"
                    traffic = models * nbytes + (2 * nbytes if mode == "fwdbwd" else 0)
                    impls = _logits_impls(models, mode, x, r, t, T, w, full, liger, env, args)
                    for impl, fn, note in impls:
                        row = dict(case=case, impl=impl, tokens=B * L, vocab=V, models=models, mode=mode,
                                   dtype="bf16", bytes=traffic, note=note)
                        if fn is None:
                            row["ms"] = None
                        else:
                            try:
                                row["ms"] = env["time"](fn)
                                row["peak_gib"] = env["peak"](fn)
                            except torch.OutOfMemoryError:
                                row["ms"], row["note"] = None, "OOM"
                            except Exception as exc:              # a baseline that fails is reported, not fatal
                                row["ms"], row["note"] = None, f"{type(exc).__name__}: {str(exc)[:120]}"
                            if dev.type == "cuda":
                                torch.cuda.empty_cache()
                        rows_out.append(row)
                        print(f"{case:40s} {impl:24s} {_fmt(row.get('ms')):>10s} ms  {row.get('note') or ''}",
                              flush=True)
                        progress(env, rows_out)
            if not env["smoke"]:
                _check_accuracy(rows_out, x, r, t, T, B * L, V)
            del full, x, r
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows_out


def progress(env, rows):
    """Hand the rows so far to env["progress"] (main() rewrites the result files), if there is one."""
    if env.get("progress") is not None:
        env["progress"](rows)


LOGPROBS_HBM_TARGET = 0.85         # issue 4: fraction of the measured HBM copy bandwidth
TARGET_MIN_BYTES = GIB             # cases that move less measure launch overhead more than bandwidth


def logits_targets(rows, env):
    """Issue 4: ours (Triton) and cuda (csrc) from-logits kernels at ≥ 85% of measured HBM bandwidth."""
    out = []
    for r in rows:
        if r.get("impl") not in ("ours", "cuda") or not r.get("ms") or r.get("pct_hbm") is None:
            continue
        if (r.get("bytes") or 0) < TARGET_MIN_BYTES:
            continue
        frac = r["pct_hbm"] / 100.0
        out.append(dict(id=f"logprobs.{r['impl']}_hbm", issue="issue 4",
                        target=f"log-prob kernel ({'Triton' if r['impl'] == 'ours' else 'CUDA'}) ≥85% of HBM",
                        where=r["case"], value=frac, need=f"≥ {LOGPROBS_HBM_TARGET:.2f} of HBM",
                        ok=frac >= LOGPROBS_HBM_TARGET))
    return out


def _check_accuracy(rows_out, x, r, t, T, N, V):
    """Max |ours - chunked fp32| on this shape, recorded once per shape as a sanity check."""
    with torch.no_grad():
        a = ops.logprobs_and_kl(x, r, t, T, "k3")
        b = _chunked_2(x, r, t, T)
        err = max((p - q).abs().max().item() for p, q in zip(a, b))
    rows_out.append(dict(case=f"accuracy N={N} V={V}", impl="ours vs chunked fp32", ms=None,
                         note=f"max |diff| over logp, ref_logp, k3, entropy = {err:.2e}"))


def _logits_impls(models, mode, x, r, t, T, w, full, liger, env, args):
    """(impl name, callable or None, note) for one case."""
    bwd = mode == "fwdbwd"

    def fwd_only(f):
        def run():
            with torch.no_grad():
                f()
        return run

    def with_bwd(f):
        def run():
            xg = x.detach().requires_grad_(True)
            _loss(f(xg), w).backward()
        return run

    if models == 1:
        cands = {
            "ours": lambda xx: ops.token_logprobs(xx, t, T),
            "eager": lambda xx: _eager_1(xx, t, T),
            "chunked": lambda xx: _chunked_1(xx, t, T),
        }
    else:
        cands = {
            "ours": lambda xx: ops.logprobs_and_kl(xx, r, t, T, "k3"),
            "eager": lambda xx: _eager_2(xx, r, t, T),
            "chunked": lambda xx: _chunked_2(xx, r, t, T),
        }
    if env["device"].type == "cuda":
        # csrc/logprobs.cu through the same op (issue 4); JIT-compiled on first use. If the extension cannot
        # load, the timing fails and the row says why.
        if models == 1:
            cands["cuda"] = lambda xx: ops.token_logprobs(xx, t, T, backend="cuda")
        else:
            cands["cuda"] = lambda xx: ops.logprobs_and_kl(xx, r, t, T, "k3", backend="cuda")
    out = []
    for name, f in cands.items():
        if args.impls and name not in args.impls:
            continue
        out.append((name, with_bwd(f) if bwd else fwd_only(lambda f=f: f(x)), None))
    if env["device"].type == "cuda" and (not args.impls or "compile" in args.impls):
        eager = _eager_1 if models == 1 else _eager_2
        comp = torch.compile(eager)
        if models == 1:
            f = (lambda xx: comp(xx, t, T))
        else:
            f = (lambda xx: comp(xx, r, t, T))
        out.append(("compile", with_bwd(f) if bwd else fwd_only(lambda: f(x)), "torch.compile(eager)"))
    if env["device"].type == "cuda" and (not args.impls or "liger" in args.impls):
        if liger is None:
            out.append(("liger", None, "liger-kernel not installed"))
        elif bwd:
            out.append(("liger", None, "forward only (no backward in fused_selective_log_softmax)"))
        else:
            # Liger reads [B, L+1, V] contiguous and drops the last position itself; t is [B, L].
            def run_liger():
                with torch.no_grad():
                    for m in range(models):
                        liger(full[m], t, T)
            out.append(("liger", run_liger, "fused_selective_log_softmax per model; no entropy/KL"))
    if args.tune and env["device"].type == "cuda" and not bwd:
        from hydra_kernels.kernels.triton.logprobs import logprobs_and_kl_forward
        t1 = t.reshape(-1)
        x3, r3 = x, r                                     # already [B, L, V] slices with unit vocab stride
        for bv in (1024, 2048, 4096, 8192):
            for nw in (4, 8, 16, 32):
                def run(bv=bv, nw=nw):
                    logprobs_and_kl_forward(x3, r3 if models == 2 else None, t1, T, "k3" if models == 2 else "none",
                                            -100, block_v=bv, num_warps=nw)
                out.append((f"ours[bv={bv},nw={nw}]", run, "tuning sweep (launcher direct)"))
        from hydra_kernels.kernels import cuda as cuda_kernels
        for threads in (128, 256, 512):
            def run_cuda(threads=threads):
                cuda_kernels.logprobs_and_kl_forward(x3, r3 if models == 2 else None, t1, T,
                                                     "k3" if models == 2 else "none", -100, threads=threads)
            out.append((f"cuda[threads={threads}]", run_cuda, "tuning sweep (launcher direct)"))
    return out


SECTIONS = {"logits": bench_logits}
SECTION_TARGETS = {"logits": logits_targets}


def bench_linear(args, env):
    """Section `linear` (ops.linear_logprobs, the LM head fused) lives in bench/bench_linear_logprobs.py."""
    return _linear_module().bench_linear(args, env)


@functools.lru_cache(maxsize=1)
def _linear_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_linear_logprobs", ROOT / "bench" / "bench_linear_logprobs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def linear_targets(rows, env):
    return _linear_module().linear_targets(rows, env)


SECTIONS["linear"] = bench_linear
SECTION_TARGETS["linear"] = linear_targets


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", choices=["logits", "linear", "all"], default="all")
    p.add_argument("--quick", action="store_true", help="fewer shapes (one vocab, two token counts)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (a few seconds)")
    p.add_argument("--tune", action="store_true",
                   help="also sweep block_v x num_warps of the Triton forward and threads of the CUDA forward")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tokens", type=int, nargs="+")
    p.add_argument("--vocab", type=int, nargs="+")
    p.add_argument("--models", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    p.add_argument("--impls", nargs="+", help="only these impls (logits: ours cuda eager chunked compile liger; "
                                              "linear: ours eager compile liger materialized chunked)")
    p.add_argument("--linear-shapes", nargs="+", metavar="DxV", help="section linear: head shapes, e.g. 3584x152064")
    p.add_argument("--linear-tokens", type=int, nargs="+", help="section linear: token counts")
    args = p.parse_args(argv)
    if args.smoke:
        args.tokens = args.tokens or [32, 64]
        args.vocab = args.vocab or [1000]
    elif args.quick:
        args.tokens = args.tokens or [4096, 16384]
        args.vocab = args.vocab or [151936]
    else:
        args.tokens = args.tokens or [4096, 16384, 32768]
        args.vocab = args.vocab or [32000, 128256, 151936]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    env = make_env(args)
    if env["device"].type == "cpu" and not args.smoke:
        print("no CUDA device: running the CPU smoke shapes (pass --smoke to silence this)", file=sys.stderr)
        args.smoke, env["smoke"] = True, True
        args.tokens, args.vocab = [32, 64], [1000]
    wanted = list(SECTIONS) if args.section == "all" else [args.section]
    for section in wanted:
        if section not in SECTIONS:
            print(f"section {section!r} is not implemented in this script yet", file=sys.stderr)
            continue
        now = _dt.datetime.now(_dt.timezone.utc)
        extra = ("pct_fp32_logits",) if section == "linear" else ()
        env["progress"] = lambda rows, section=section, now=now, extra=extra: write_results(
            section, rows, env, args, args.out, extra, now=now, complete=False)
        rows = SECTIONS[section](args, env)
        j, m = write_results(section, rows, env, args, args.out, extra, now=now)
        print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
