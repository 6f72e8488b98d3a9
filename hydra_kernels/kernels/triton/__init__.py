"""Triton kernels, one module per op (imported lazily by hydra_kernels.ops so CPU use never needs triton).

This package file itself imports no triton: hydra_kernels.ops.backend reads triton_interpreting() from here.
"""

import contextlib
import functools
import json
import os

import torch

__all__ = ["device_guard", "triton_interpreting", "on_interpreter", "skip_listed", "SKIP_CONFIGS_ENV"]

# A JSON-lines file of launch configs to leave out of autotuning (bench/gpu_call.py writes it from the offline
# sm_90 builds in bench/results/triton_sm90_builds: configs that spill heavily or do not build).
SKIP_CONFIGS_ENV = "HYDRA_KERNELS_TRITON_SKIP_CONFIGS"


def triton_interpreting() -> bool:
    """True when TRITON_INTERPRET=1: Triton then runs kernels in its interpreter on CPU tensors (the variable
    must be set before triton is imported, as tests/conftest.py does)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_interpreter(t: torch.Tensor) -> bool:
    """A launch on t runs in the interpreter (t is no CUDA tensor), where the launchers pick small tiles."""
    return t.device.type != "cuda"


def device_guard(t: torch.Tensor):
    """Make t's GPU the current device for a launch: Triton launches on the current device and its current
    stream, whatever device the pointers live on (tensors on cuda:1 with cuda:0 current would fault).
    A no-op context for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


@functools.lru_cache(maxsize=8)
def _skip_records(path: str) -> tuple:
    try:
        with open(path) as f:
            recs = tuple(json.loads(line) for line in f if line.strip())
    except (OSError, ValueError) as e:
        raise ValueError(f"{SKIP_CONFIGS_ENV}: cannot read {path!r}: {e}") from None
    for r in recs:
        if not isinstance(r, dict) or not {"kernel", "kwargs", "num_warps", "num_stages"} <= r.keys():
            raise ValueError(f"{SKIP_CONFIGS_ENV}: {path!r}: a record needs kernel, kwargs, num_warps, num_stages "
                             f"(and optionally where): {r!r}")
    return recs


def skip_listed(kernel: str, configs: list, **where) -> list:
    """`configs` less those that the file named by $HYDRA_KERNELS_TRITON_SKIP_CONFIGS lists for this launch.

    Called by the autotuners' prune functions; without the variable it returns `configs` unchanged. A record
    {"kernel", "kwargs", "num_warps", "num_stages", "where"} matches a config when the kernel name, every entry of
    kwargs, num_warps and num_stages are equal, and every entry of `where` equals the launch's (e.g. streams=2,
    r_pad=64, dtype="bf16"). Only which configs are timed changes, never what a config
    computes. If every config is listed, all are kept (the autotuner needs one).

    Args: kernel: the kernel's name as the records spell it; configs: triton.Config list; where: launch facts.
    Returns: the kept configs, in their order. Raises: ValueError naming the variable if the file is unreadable.
    """
    path = os.environ.get(SKIP_CONFIGS_ENV)
    if not path:
        return configs

    def listed(c) -> bool:
        for r in _skip_records(path):
            if (r["kernel"] == kernel and r["num_warps"] == c.num_warps and r["num_stages"] == c.num_stages
                    and all(c.kwargs.get(k) == v for k, v in r["kwargs"].items())
                    and all(k in where and where[k] == v for k, v in r.get("where", {}).items())):
                return True
        return False

    kept = [c for c in configs if not listed(c)]
    return kept or configs
