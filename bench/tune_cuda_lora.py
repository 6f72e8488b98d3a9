"""Sweep the launch configuration of the CUDA small-batch LoRA kernel (csrc/lora_linear_small.cu) on a GPU.

For each shape it times every (block_m_warps, splits) pair with triton.testing.do_bench_cudagraph and reports the
weight bandwidth (N·K·2 bytes / time) against the measured HBM copy bandwidth, the best pair, and what the
heuristic in hydra_kernels.kernels.cuda.lora_small_config picks -- the numbers to replace the heuristic (and the
dispatch crossover in hydra_kernels/ops/lora_linear.py) with.

    python bench/tune_cuda_lora.py                       # default sweep, prints a table
    python bench/tune_cuda_lora.py --out bench/results   # + JSON and Markdown
    python bench/tune_cuda_lora.py --shapes 4096x4096 --rows 1,16,64 --streams 2
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sweep(args, ck, tt, dev, hbm, sms, optin, layout, results) -> None:
    """Time every (block_m_warps, splits) pair per shape; appends one row per shape to `results` as it goes."""
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.lower().split("x"))
        for m in (int(v) for v in args.rows.split(",")):
            R = m * args.streams
            if R > ck.LORA_MAX_ROWS:
                continue
            g = torch.Generator(device="cpu").manual_seed(0)
            x = (torch.randn(R, K, generator=g)).to(dev, torch.bfloat16)
            w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dev, torch.bfloat16)
            A = (torch.randn(2, args.rank, K, generator=g) * K ** -0.5).to(dev, torch.bfloat16)
            B = (torch.randn(2, N, args.rank, generator=g) * args.rank ** -0.5).to(dev, torch.bfloat16)
            n_used = len({a for a in layout if a >= 0})
            heur = ck.lora_small_config(R, N, K, args.rank, n_used, sms, optin)
            timings = {}
            for mw in (1, 2):
                for sp in (int(v) for v in args.splits.split(",")):
                    def fn(mw=mw, sp=sp):
                        ck.lora_linear_forward(x, w, None, A, B, [2.0, 2.0], layout, block_m_warps=mw, splits=sp)
                    try:
                        fn()
                        torch.cuda.synchronize()
                        timings[(mw, sp)] = float(tt.do_bench_cudagraph(fn, rep=50, return_mode="median"))
                    except Exception as e:        # e.g. too much shared memory for this pair
                        timings[(mw, sp)] = None
                        print(f"  K={K} N={N} rows/stream={m} mw={mw} splits={sp}: {type(e).__name__}: {e}"[:160])
            ok = {k: v for k, v in timings.items() if v is not None}
            if not ok:                            # every pair failed (printed above): no row for this shape
                continue
            best = min(ok, key=ok.get)
            wbytes = N * K * 2
            row = dict(K=K, N=N, rows_per_stream=m, streams=args.streams, rank=args.rank,
                       best=dict(block_m_warps=best[0], splits=best[1], ms=ok[best],
                                 weight_gbps=wbytes / (ok[best] * 1e-3) / 1e9),
                       heuristic=dict(block_m_warps=heur[0], splits=heur[1], ms=ok.get(tuple(heur))) if heur else None,
                       all={f"{k[0]},{k[1]}": v for k, v in timings.items()})
            row["best"]["pct_hbm"] = 100 * row["best"]["weight_gbps"] / hbm
            results.append(row)
            hm = row["heuristic"]["ms"] if row["heuristic"] else None
            print(f"K={K:<6} N={N:<6} rows/stream={m:<3} best mw={best[0]} splits={best[1]:<3} {ok[best]:.4f} ms "
                  f"{row['best']['weight_gbps']:.0f} GB/s ({row['best']['pct_hbm']:.0f}% HBM); heuristic {heur} "
                  f"{hm if hm is None else f'{hm:.4f}'} ms", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096,4096x1024", help="KxN list")
    ap.add_argument("--rows", default="1,8,16,32,64", help="rows per stream")
    ap.add_argument("--streams", type=int, default=2, help="streams: base + adapters (2 = base, actor)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--splits", default="1,2,3,4,6,8,12,16,24,32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton.testing as tt

    from hydra_kernels.kernels import cuda as ck
    ck.load()
    dev = torch.device("cuda")
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    hbm = 2 * src.numel() * 2 / (tt.do_bench(lambda: dst.copy_(src), rep=200, return_mode="median") * 1e-3) / 1e9
    del src, dst
    sms, optin = ck._sm_count_and_smem(dev)
    layout = [-1] + [i % 2 for i in range(args.streams - 1)]
    results = []
    print(f"{torch.cuda.get_device_name()}: HBM copy {hbm:.0f} GB/s, {sms} SMs; layout {layout}, rank {args.rank}")
    interrupted = False
    try:
        _sweep(args, ck, tt, dev, hbm, sms, optin, layout, results)
    except KeyboardInterrupt:     # Ctrl-C, or run_gpu.sh's time limit (SIGINT): keep and write what was measured
        interrupted = True
        print(f"interrupted after {len(results)} shape(s); writing those", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        date = _dt.datetime.now(_dt.timezone.utc)
        dev_name = "".join(c if c.isalnum() else "_" for c in torch.cuda.get_device_name()).lower()[:40]
        base = os.path.join(args.out, f"tune_cuda_lora_{dev_name}_{date:%Y-%m-%d}")
        meta = dict(device=torch.cuda.get_device_name(), date=date.isoformat(timespec="seconds"),
                    torch=torch.__version__, cuda=torch.version.cuda, hbm_copy_GBps=hbm, sms=sms,
                    layout=layout, timing="do_bench_cudagraph median", interrupted=interrupted, results=results)
        with open(base + ".json", "w") as f:
            json.dump(meta, f, indent=1)
        lines = [f"# CUDA small-batch LoRA launch sweep — {meta['device']}", "",
                 f"{meta['date']} · torch {meta['torch']} · CUDA {meta['cuda']} · HBM copy {hbm:.0f} GB/s · "
                 f"layout {layout} · rank {args.rank} · bf16"
                 + (" · **interrupted**: the shapes below only" if interrupted else ""), "",
                 "| K | N | rows/stream | best (mw, splits) | ms | W GB/s | % HBM | heuristic | heuristic ms |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            b, h = r["best"], r["heuristic"] or {}
            lines.append(f"| {r['K']} | {r['N']} | {r['rows_per_stream']} | ({b['block_m_warps']}, {b['splits']}) | "
                         f"{b['ms']:.4f} | {b['weight_gbps']:.0f} | {b['pct_hbm']:.0f}% | "
                         f"({h.get('block_m_warps')}, {h.get('splits')}) | {h.get('ms')} |")
        with open(base + ".md", "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {base}.json and {base}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
