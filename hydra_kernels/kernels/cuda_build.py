"""Sources and compiler flags of the csrc/ CUDA extension, shared by setup.py and the just-in-time build.

setup.py runs this file with runpy before hydra_kernels is importable, so it imports nothing from
hydra_kernels and nothing that needs torch; only the standard library.

Flags, and why:
  -O3, -lineinfo          optimised code; line info costs nothing at run time and makes profiles readable.
  -gencode sm_80, sm_90   A100 and H100/H200 SASS, plus compute_90 PTX so newer GPUs can JIT it.
                          (HYDRA_KERNELS_CUDA_ARCHS="80;90" overrides the list; "+PTX" is not parsed, the
                          highest arch always ships PTX.)
  no --use_fast_math      it would turn every expf/logf into the approximate forms and flush denormals
                          everywhere. The kernels use the approximate exp2 (ex2.approx, what expf and Triton's
                          tl.exp use anyway) exactly where they mean to, in the per-element softmax terms;
                          logs and the per-row formulas stay accurate.
  -Xptxas -v              only with HYDRA_KERNELS_PTXAS_VERBOSE=1 (registers and spills per kernel).
  no -std=...             torch's build adds the C++ standard its headers need (c++17 or c++20).
"""
from __future__ import annotations

import glob
import hashlib
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(_HERE))
CSRC = os.path.join(REPO_ROOT, "csrc")
DEFAULT_ARCHS = ("80", "90")


def cuda_archs() -> list[str]:
    env = os.environ.get("HYDRA_KERNELS_CUDA_ARCHS", "").strip()
    if not env:
        return list(DEFAULT_ARCHS)
    archs = [a.strip().replace(".", "").replace("+PTX", "") for a in env.replace(",", ";").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise ValueError(f"HYDRA_KERNELS_CUDA_ARCHS: expected e.g. '80;90', got {env!r}")
    return archs


def gencode_flags(archs: list[str] | None = None) -> list[str]:
    archs = cuda_archs() if archs is None else archs
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    top = max(archs, key=int)
    flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def nvcc_flags() -> list[str]:
    flags = ["-O3", "-lineinfo", *gencode_flags()]
    if os.environ.get("HYDRA_KERNELS_PTXAS_VERBOSE") == "1":
        flags += ["-Xptxas", "-v"]
    return flags


def cxx_flags() -> list[str]:
    return ["-O3"]


def source_files(root: str | None = None) -> list[str]:
    """The .cu kernels and the registration file, sorted. Paths relative to `root` when given (setup.py wants
    relative paths), else absolute."""
    files = sorted(glob.glob(os.path.join(CSRC, "*.cu"))) + [os.path.join(CSRC, "ops.cpp")]
    if root is not None:
        files = [os.path.relpath(f, root) for f in files]
    return files


def header_files() -> list[str]:
    return sorted(glob.glob(os.path.join(CSRC, "*.h")) + glob.glob(os.path.join(CSRC, "*.cuh")))


def extension_kwargs(root: str | None = None) -> dict:
    """Keyword arguments for torch.utils.cpp_extension.CUDAExtension (setup.py runs from the repository root)."""
    root = os.getcwd() if root is None else root
    return {
        "sources": source_files(root),
        "include_dirs": [os.path.relpath(CSRC, root)],
        "extra_compile_args": {"cxx": cxx_flags(), "nvcc": nvcc_flags()},
    }


def jit_kwargs() -> dict:
    """Keyword arguments for torch.utils.cpp_extension.load (absolute paths)."""
    return {
        "sources": source_files(),
        "extra_include_paths": [CSRC],
        "extra_cflags": cxx_flags(),
        "extra_cuda_cflags": nvcc_flags(),
    }


def source_hash(extra: str = "") -> str:
    """Hash of every source and header, the flags and `extra` (torch/CUDA/Python versions): the JIT cache key."""
    h = hashlib.sha256()
    for path in source_files() + header_files():
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(repr((nvcc_flags(), cxx_flags(), extra)).encode())
    return h.hexdigest()[:16]
