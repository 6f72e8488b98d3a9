"""`hydra-rlhf`: the command line (subcommands are added by the modules that implement them)."""
from __future__ import annotations

import argparse
import sys


def _selfcheck(args) -> int:
    """Check every op's CPU path against the float64 reference on random data, and time it."""
    import time

    import torch

    from hydra_kernels import ops, reference

    torch.manual_seed(0)
    x, w, b = torch.randn(3 * 64, 256), torch.randn(384, 256) / 16, torch.randn(384)
    A, B = torch.randn(2, 16, 256) / 16, torch.randn(2, 384, 16) / 4
    layout = (-1, 0, 1)
    y = ops.lora_linear(x, w, b, A, B, 2.0, layout)
    ref = reference.lora_linear(x.double(), w.double(), b.double(), A.double(), B.double(), [2.0, 2.0], layout)
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    t0 = time.perf_counter()
    for _ in range(20):
        ops.lora_linear(x, w, b, A, B, 2.0, layout)
    ms = (time.perf_counter() - t0) / 20 * 1e3
    print(f"lora_linear  3 streams x 64 rows, 256->384, r=16: rel err {err:.2e}, {ms:.3f} ms (cpu, torch backend)")
    return 0 if err < 1e-5 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hydra-rlhf", description="Hydra-RLHF on fused kernels")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="check the ops against the float64 reference on CPU")
    p.set_defaults(func=_selfcheck)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
