"""Installs hydra_kernels and the `hydra-rlhf` command.

The CUDA extension (csrc/) is built only where a CUDA toolkit and a CUDA-enabled torch are both present
(`pip install --no-build-isolation .`); everywhere else the package installs as pure Python and the
CUDA kernels are compiled just in time with ninja on first use, where a GPU exists.
"""
import glob
import os
import runpy

from setuptools import find_packages, setup


def cuda_extension():
    if os.environ.get("HYDRA_KERNELS_NO_CUDA_BUILD") == "1":
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:          # isolated build environment: no torch, pure-Python install
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        return [], {}
    # The sources and nvcc flags live in one place, shared with the just-in-time build.
    build = runpy.run_path(os.path.join("hydra_kernels", "kernels", "cuda_build.py"))
    ext = CUDAExtension(name="hydra_kernels._C", **build["extension_kwargs"]())
    return [ext], {"build_ext": BuildExtension}


have_sources = glob.glob("csrc/*.cu") and os.path.exists("hydra_kernels/kernels/cuda_build.py")
ext_modules, cmdclass = cuda_extension() if have_sources else ([], {})

setup(
    name="hydra_kernels",
    version="0.1.0",
    description="Fused multi-stream LoRA and log-prob kernels for Hydra-RLHF (PPO at the memory of SFT)",
    packages=find_packages(include=["hydra_kernels", "hydra_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "transformers>=4.45",
        "safetensors>=0.4",
        "ninja",
        "tqdm",
        "pyyaml",
        # TRL users' datasets: save_to_disk directories, datasets.Dataset objects; pyarrow (one of its
        # dependencies) reads parquet. JSONL, JSON and CSV are read without it.
        "datasets>=2.19",
    ],
    # tensorboardX: TensorBoard event files (run.report_to) without tensorboard's server and its dependencies.
    extras_require={"test": ["pytest>=7", "peft>=0.13", "tensorboardX", "deepspeed>=0.16"]},
    entry_points={"console_scripts": ["hydra-rlhf=hydra_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
