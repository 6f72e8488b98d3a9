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
  materialized  logits = h·Wᵀ in bf16 (cuBLAS) per stream, then the from-logits op (ops.token_logprobs /
                ops.logprobs_and_kl); autograd through both for the backward
  chunked       one sweep per model, as peers do: 1024-token chunks, fp32 log_softmax of (h_c·Wᵀ)/T, gather,
                entropy; the actor's chunks under torch.utils.checkpoint (recomputed in backward, so memory stays
                bounded), the reference's under no_grad

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


IMPLS = {"ours": _ours, "materialized": _materialized, "chunked": _chunked}


# ------------------------------------------------------------------------------------------------ section
def bench_linear(args, env):
    dev = env["device"]
    smoke = env["smoke"]
    shapes = SMOKE_SHAPES if smoke else (SHAPES[1:] if getattr(args, "quick", False) else SHAPES)
    tokens = SMOKE_TOKENS if smoke else ([4096, 16384] if getattr(args, "quick", False) else TOKENS)
    streams = list(getattr(args, "models", None) or [1, 2])
    modes = list(getattr(args, "modes", None) or ["fwd", "fwdbwd"])
    impls = [i for i in IMPLS if not getattr(args, "impls", None) or i in args.impls]
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    rows = []
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
                    flops = 2.0 * S * N * D * V * (3 if mode == "fwdbwd" else 1)
                    for impl in impls:
                        fn = _runner(IMPLS[impl], hs, w, tg, S, mode, wts)
                        row = dict(case=case, impl=impl, tokens=N, D=D, V=V, streams=S, mode=mode,
                                   dtype=str(dtype).replace("torch.", ""), flops=flops, ratio_ref="chunked",
                                   fp32_logits_gib=fp32_logits / GIB, note=None)
                        try:
                            row["ms"] = env["time"](fn)
                            peak = env["peak"](fn)
                            row["peak_gib"] = peak
                            if peak is not None:
                                row["pct_fp32_logits"] = 100.0 * peak * GIB / fp32_logits
                                # Also in the note: the shared table shows only its standard columns.
                                row["note"] = f"extra peak {row['pct_fp32_logits']:.2f}% of fp32 logits"
                        except torch.OutOfMemoryError:
                            row["ms"], row["note"] = None, "OOM"
                        except Exception as exc:               # a failing impl is reported, not fatal
                            row["ms"], row["note"] = None, f"{type(exc).__name__}: {str(exc)[:160]}"
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                        rows.append(row)
                        print(f"{case:44s} {impl:14s} {_ms(row.get('ms')):>10s} ms  {row.get('note') or ''}",
                              flush=True)
                rows.append(_accuracy_row(hs, w, tg, S, N, D, V))
            del h_all
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    rows.extend(_target_rows(rows))
    return rows


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


def _target_rows(rows):
    """One row per 2-stream case of ours: does it meet the issue's targets?"""
    out = []
    for r in rows:
        if r["impl"] != "ours" or r.get("streams") != 2 or not r.get("ms"):
            continue
        tflops = r["flops"] / (r["ms"] * 1e-3) / 1e12
        need = TARGETS[r["mode"]]
        pct = r.get("pct_fp32_logits")
        ok = tflops >= need and (pct is None or pct <= TARGETS["pct_fp32_logits"])
        out.append(dict(case=r["case"], impl="target", ms=None,
                        note=f"{'MET' if ok else 'MISSED'}: {tflops:.0f} TFLOP/s (need ≥ {need:.0f}), extra peak "
                             f"{'-' if pct is None else f'{pct:.2f}'}% of fp32 logits (need ≤ 5%)"))
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
    args = p.parse_args(argv)
    env = common.make_env(args)
    if env["device"].type == "cpu" and not args.smoke:
        print("no CUDA device: running the CPU smoke shapes (pass --smoke to silence this)", file=sys.stderr)
        args.smoke, env["smoke"] = True, True
    rows = bench_linear(args, env)
    j, m = common.write_results("linear", rows, env, args, args.out,
                                extra_cols=("pct_fp32_logits",))
    print(f"wrote {j} and {m}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
