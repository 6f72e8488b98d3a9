"""Section `linear` of bench/bench_logprobs.py: ops.linear_logprobs (the LM head fused with log-probs / KL /
entropy; logits never stored) against what users run today.

    python bench/bench_logprobs.py --section linear            # GPU, writes bench/results/
    python bench/bench_linear_logprobs.py [--quick | --smoke]  # the same, standalone
    python bench/bench_linear_logprobs.py --smoke --out /tmp/x # tiny CPU run (tests/bench/test_bench_linear_logprobs.py)

Cases: (D, V) = (4096, 128256) (Llama-3-8B head) and (3584, 152064) (Qwen2-7B head), tokens 4096 / 8192 / 16384,
bf16, 1 stream (log-probs + entropy) or 2 streams (actor + reference: log-probs, entropy, k3 KL), forward only
(no_grad, the scoring pass) and forward+backward (the PPO update: gradient to the actor stream only, the
reference stream detached, the head frozen; loss = Σ w1·logp + Σ w2·entropy [+ Σ w3·kl] with per-token weights).

Impls:
  ours          ops.linear_logprobs: one sweep over W for all streams (Triton on GPU, torch chunks on CPU)
  eager         what a user writes: logits = (h·Wᵀ).float() / T per stream, fp32 log_softmax, gather, entropy,
                k3 from the two log-probs; the fp32 logits [tokens, V] exist per stream (and autograd keeps them)
  compile       (GPU) torch.compile of `eager` (one graph per mode; its compile time is outside the timing)
  liger         (GPU, when liger-kernel imports) Liger-Kernel's LigerFusedLinearCrossEntropyLoss(reduction="none")
                per stream: log-probs = −CE, k3 from the two; no entropy (Liger's fused head has none)
  materialized  logits = h·Wᵀ in bf16 (cuBLAS) per stream, then the from-logits op (ops.token_logprobs /
                ops.logprobs_and_kl); autograd through both for the backward
  chunked       one sweep per model, as peers do: 1024-token chunks, fp32 log_softmax of (h_c·Wᵀ)/T, gather,
                entropy; the actor's chunks under torch.utils.checkpoint (recomputed in backward, so memory stays
                bounded), the reference's under no_grad
The compiling impl runs after every other impl of every case (a time limit then costs it, not the others).
--shapes DxV and --tokens pick the cases (bench_logprobs: --linear-shapes, --linear-tokens).

Reported: median ms, effective TFLOP/s with the convention of issue 3 (2·tokens·D·V per stream forward, ×3 for
forward+backward, every stream counted even though only the actor takes a gradient), peak extra memory while the
call runs (GiB) and as a % of the fp32 logits [S, tokens, V] that a materializing implementation would hold
(`pct_fp32_logits`), and speed vs `chunked`. Targets (H200, bf16, 2 streams): forward ≥ 550 TFLOP/s, fwd+bwd
≥ 450 TFLOP/s, extra peak ≤ 5% of the fp32 logits.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "bench")):
    if p not in sys.path:
        sys.path.insert(0, p)

from hydra_kernels import ops  # noqa: E402

GIB = 1 << 30
SHAPES = [(4096, 128256), (3584, 152064)]          # (D, V)
TOKENS = [4096, 8192, 16384]
SMOKE_SHAPES = [(64, 1003)]
SMOKE_TOKENS = [48]
TEMPERATURE = 1.0
CHUNK = 1024
TARGETS = {"fwd": 550.0, "fwdbwd": 450.0, "pct_fp32_logits": 5.0}


# -------------------------------------------------------------------------------------------- baselines
def _materialized(hs, w, tg, T, S):
    logits = [h @ w.T for h in hs]                                   # bf16 [tokens, V] per stream
    if S == 1:
        lp = ops.token_logprobs(logits[0], tg, T)
        lp_all = torch.log_softmax(logits[0].float() / T, -1)
        ent = -(lp_all.exp() * lp_all).sum(-1)
        return lp, ent, None
    lp, _, kl, ent = ops.logprobs_and_kl(logits[0], logits[1], tg, T, "k3")
    return lp, ent, kl


def _chunk_stats(h, w, tg, T, want_entropy):
    z = (h @ w.T).float() / T
    lp_all = torch.log_softmax(z, -1)
    lp = lp_all.gather(-1, tg.unsqueeze(-1)).squeeze(-1)
    ent = -(lp_all.exp() * lp_all).sum(-1) if want_entropy else torch.zeros_like(lp)
    return lp, ent


def _chunked(hs, w, tg, T, S):
    """One sweep per model; the actor's chunks are checkpointed so the backward recomputes their logits."""
    from torch.utils.checkpoint import checkpoint
    n = tg.shape[0]
    outs = []
    for s, h in enumerate(hs):
        lps, ents = [], []
        for a in range(0, n, CHUNK):
            b = min(n, a + CHUNK)
            if h.requires_grad:
                lp, ent = checkpoint(_chunk_stats, h[a:b], w, tg[a:b], T, s == 0, use_reentrant=False)
            else:
                with torch.no_grad():
                    lp, ent = _chunk_stats(h[a:b], w, tg[a:b], T, s == 0)
            lps.append(lp)
            ents.append(ent)
        outs.append((torch.cat(lps), torch.cat(ents)))
    if S == 1:
        return outs[0][0], outs[0][1], None
    d = outs[1][0] - outs[0][0]
    return outs[0][0], outs[0][1], torch.expm1(d) - d


def _ours(hs, w, tg, T, S):
    lp, ent, kl = ops.linear_logprobs(list(hs), w, tg, T, "k3" if S == 2 else None)
    return lp[0], ent[0], kl


def _eager(hs, w, tg, T, S):
    """fp32 logits per stream, log_softmax, gather; entropy of the actor; k3 between the two."""
    lps = []
    ent = None
    for s, h in enumerate(hs):
        lp_all = torch.log_softmax((h @ w.T).float() / T, -1)
        lps.append(lp_all.gather(-1, tg.unsqueeze(-1)).squeeze(-1))
        if s == 0:
            ent = -(lp_all.exp() * lp_all).sum(-1)
    if S == 1:
        return lps[0], ent, None
    d = lps[1] - lps[0]
    return lps[0], ent, torch.expm1(d) - d


_COMPILED = {}


def _compiled(hs, w, tg, T, S):
    fn = _COMPILED.get("eager")
    if fn is None:
        fn = _COMPILED["eager"] = torch.compile(_eager)
    return fn(hs, w, tg, T, S)


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except Exception:                                   # not installed, or it does not import here: say so
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="none")


def _liger(hs, w, tg, T, S):
    """Per stream Liger's fused linear cross-entropy (reduction none): log-prob = −CE; no entropy."""
    loss = _liger_loss()
    lps = [-loss(w, h / T if T != 1.0 else h, tg) for h in hs]
    if S == 1:
        return lps[0], None, None
    d = lps[1] - lps[0]
    return lps[0], None, torch.expm1(d) - d


IMPLS = {"ours": _ours, "eager": _eager, "liger": _liger, "materialized": _materialized, "chunked": _chunked,
         "compile": _compiled}
GPU_ONLY = {"compile", "liger"}
LAST = ("compile",)                 # compiling impls: after every other impl of every case


# ------------------------------------------------------------------------------------------------ section
def _shape(text):
    try:
        d, v = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--shapes: expected DxV (hidden x vocab), got {text!r}") from None
    return d, v


def _cases(args, smoke):
    quick = getattr(args, "quick", False)
    shapes = [_shape(x) for x in (getattr(args, "linear_shapes", None) or getattr(args, "shapes", None) or [])]
    tokens = getattr(args, "linear_tokens", None) or getattr(args, "tokens_linear", None)
    shapes = shapes or (SMOKE_SHAPES if smoke else (SHAPES[1:] if quick else SHAPES))
    tokens = tokens or (SMOKE_TOKENS if smoke else ([4096, 16384] if quick else TOKENS))
    return shapes, tokens


def bench_linear(args, env):
    dev = env["device"]
    smoke = env["smoke"]
    shapes, tokens = _cases(args, smoke)
    streams = list(getattr(args, "models", None) or [1, 2])
    modes = list(getattr(args, "modes", None) or ["fwd", "fwdbwd"])
    impls = [i for i in IMPLS if (not getattr(args, "impls", None) or i in args.impls)
             and (dev.type == "cuda" or i not in GPU_ONLY)]
    passes = [[i for i in impls if i not in LAST], [i for i in impls if i in LAST]]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
    order = {}                                          # case -> position, for the table's order
    for n_pass, pass_impls in enumerate(passes):
        if not pass_impls:
            continue
        for D, V in shapes:
            g = torch.Generator(device=dev).manual_seed(0)
            w = (torch.randn(V, D, device=dev, generator=g) * (4.0 / D ** 0.5)).to(dtype)
            for N in tokens:
                base = torch.randn(N, D, device=dev, generator=g)
                h_all = [(base + 0.3 * torch.randn(N, D, device=dev, generator=g)).to(dtype) for _ in range(2)]
                del base
                tg = torch.randint(0, V, (N,), device=dev, generator=g)
                wts = [torch.randn(N, device=dev, generator=g) for _ in range(3)]
                for S in streams:
                    hs = h_all[:S]
                    fp32_logits = S * N * V * 4
                    for mode in modes:
                        case = f"{mode} S={S} N={N} D={D} V={V}"
                        order.setdefault(case, len(order))
                        flops = 2.0 * S * N * D * V * (3 if mode == "fwdbwd" else 1)
                        for impl in pass_impls:
                            row = dict(case=case, impl=impl, tokens=N, D=D, V=V, streams=S, mode=mode,
                                       dtype=str(dtype).replace("torch.", ""), flops=flops, ratio_ref="chunked",
                                       fp32_logits_gib=fp32_logits / GIB, note=None)
                            _measure(row, IMPLS[impl], hs, w, tg, S, mode, wts, env, fp32_logits)
                            rows.append(row)
                            print(f"{case:44s} {impl:14s} {_ms(row.get('ms')):>10s} ms  {row.get('note') or ''}",
                                  flush=True)
                            _progress(env, rows, order)
                    if n_pass == 0:
                        rows.append(_accuracy_row(hs, w, tg, S, N, D, V))
                        order.setdefault(rows[-1]["case"], len(order))
                del h_all
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    rows = _ordered(rows, order)
    rows.extend(_target_rows(rows))
    return rows


def _measure(row, f, hs, w, tg, S, mode, wts, env, fp32_logits):
    if f is _liger and _liger_loss() is None:
        row["ms"], row["note"] = None, "liger-kernel not installed (carry its wheel: see bench/run_gpu.sh)"
        return
    fn = _runner(f, hs, w, tg, S, mode, wts)
    try:
        if f is _compiled:
            fn()                                        # compile outside the timing
        row["ms"] = env["time"](fn)
        peak = env["peak"](fn)
        row["peak_gib"] = peak
        if peak is not None:
            row["pct_fp32_logits"] = 100.0 * peak * GIB / fp32_logits
            # Also in the note: the shared table shows only its standard columns.
            row["note"] = f"extra peak {row['pct_fp32_logits']:.2f}% of fp32 logits"
        if f is _liger:
            row["note"] = (row["note"] + "; " if row["note"] else "") + "no entropy"
    except torch.OutOfMemoryError:
        row["ms"], row["note"] = None, "OOM"
    except Exception as exc:               # a failing impl is reported, not fatal
        row["ms"], row["note"] = None, f"{type(exc).__name__}: {str(exc)[:160]}"
    if env["device"].type == "cuda":
        torch.cuda.empty_cache()


def _ordered(rows, order):
    """Rows by case (first measured first), then in IMPLS order; accuracy rows after their cases."""
    rank = {name: i for i, name in enumerate(IMPLS)}
    return sorted(rows, key=lambda r: (order.get(r["case"], len(order)), rank.get(r["impl"], len(rank))))


def _progress(env, rows, order):
    if env.get("progress") is not None:
        env["progress"](_ordered(rows, order))


def _ms(v):
    return "-" if v is None else f"{v:.3f}"


def _runner(f, hs, w, tg, S, mode, wts):
    if mode == "fwd":
        def run():
            with torch.no_grad():
                f(hs, w, tg, TEMPERATURE, S)
        return run

    def run_bwd():
        actor = hs[0].detach().requires_grad_(True)
        streams = [actor] + [h.detach() for h in hs[1:]]
        lp, ent, kl = f(streams, w, tg, TEMPERATURE, S)
        loss = (lp * wts[0]).sum() + (ent * wts[1]).sum()
        if kl is not None:
            loss = loss + (kl * wts[2]).sum()
        loss.backward()
    return run_bwd


def _accuracy_row(hs, w, tg, S, N, D, V):
    """max |ours − chunked fp32| over (logp, entropy, kl) of stream 0 on this shape (a sanity check)."""
    try:
        with torch.no_grad():
            a = _ours(hs, w, tg, TEMPERATURE, S)
            b = _chunked(hs, w, tg, TEMPERATURE, S)
        err = max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b) if x is not None)
        note = f"max |ours - chunked fp32| over logp, entropy{', k3' if S == 2 else ''} = {err:.2e}"
    except Exception as exc:
        err, note = None, f"{type(exc).__name__}: {str(exc)[:160]}"
    return dict(case=f"accuracy S={S} N={N} D={D} V={V}", impl="ours vs chunked", ms=None, max_abs_err=err,
                note=note)


def linear_targets(rows, env=None):
    """Issue 3's targets for every 2-stream case of ours: TFLOP/s by mode, and the extra peak memory."""
    out = []
    for r in rows:
        if r["impl"] != "ours" or r.get("streams") != 2 or not r.get("ms"):
            continue
        tflops = r["flops"] / (r["ms"] * 1e-3) / 1e12
        need = TARGETS[r["mode"]]
        out.append(dict(id=f"linear_logprobs.{r['mode']}_tflops", issue="issue 3",
                        target=f"linear_logprobs 2 streams {r['mode']} ≥{need:.0f} TFLOP/s", where=r["case"],
                        value=tflops, need=f"≥ {need:.0f} TFLOP/s", ok=tflops >= need))
        pct = r.get("pct_fp32_logits")
        if pct is not None:
            out.append(dict(id="linear_logprobs.peak_pct", issue="issue 3",
                            target="linear_logprobs extra peak ≤5% of fp32 logits", where=r["case"], value=pct,
                            need=f"≤ {TARGETS['pct_fp32_logits']:.0f}%", ok=pct <= TARGETS["pct_fp32_logits"]))
    return out


def _target_rows(rows):
    """One table row per 2-stream case of ours: does it meet the issue's targets (both of them)?"""
    by_case = {}
    for t in linear_targets(rows):
        by_case.setdefault(t["where"], []).append(t)
    out = []
    for case, ts in by_case.items():
        speed = next(t for t in ts if t["id"].endswith("_tflops"))
        mem = next((t for t in ts if t["id"] == "linear_logprobs.peak_pct"), None)
        ok = all(t["ok"] for t in ts)
        pct = "-" if mem is None else f"{mem['value']:.2f}"
        out.append(dict(case=case, impl="target", ms=None,
                        note=f"{'MET' if ok else 'MISSED'}: {speed['value']:.0f} TFLOP/s (need {speed['need']}), "
                             f"extra peak {pct}% of fp32 logits (need ≤ 5%)"))
    return out


# -------------------------------------------------------------------------------------------- standalone
def main(argv=None) -> int:
    import bench_logprobs as common                  # the shared environment and results writer
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one head shape, 4096 and 16384 tokens")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (seconds)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--models", type=int, nargs="+", choices=[1, 2], default=[1, 2], help="streams")
    p.add_argument("--modes", nargs="+", choices=["fwd", "fwdbwd"], default=["fwd", "fwdbwd"])
    p.add_argument("--impls", nargs="+", choices=list(IMPLS))
    p.add_argument("--shapes", nargs="+", metavar="DxV", help="head shapes, e.g. 3584x152064")
    p.add_argument("--tokens", type=int, nargs="+", dest="tokens_linear", help="token counts")
    args = p.parse_args(argv)
    env = common.make_env(args)
    if env["device"].type == "cpu" and not args.smoke:
        print("no CUDA device: running the CPU smoke shapes (pass --smoke to silence this)", file=sys.stderr)
        args.smoke, env["smoke"] = True, True
    now = common._dt.datetime.now(common._dt.timezone.utc)
    env["progress"] = lambda rows: common.write_results("linear", rows, env, args, args.out, ("pct_fp32_logits",),
                                                        now=now, complete=False, targets=linear_targets(rows))
    rows = bench_linear(args, env)
    j, m = common.write_results("linear", rows, env, args, args.out, extra_cols=("pct_fp32_logits",), now=now,
                                targets=linear_targets(rows))
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
