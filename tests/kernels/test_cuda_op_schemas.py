"""CPU checks of the Python side of the CUDA extension's ops that otherwise runs only once the extension has loaded
on a GPU, and of csrc/ops.cpp under the C++ standard of the GPU image's torch.

* hydra_kernels.kernels.cuda._register_fakes (the shapes torch.compile / FakeTensor tracing see) against the
  schemas csrc/ops.cpp defines: here the schemas are defined from Python (in a subprocess, so that this process's
  torch.ops stays free of them), the fakes registered, and every op called on meta tensors.
* ops.cpp syntax-checked as C++17 against the installed torch's headers: torch 2.11's cpp_extension (the GPU
  image's torch) compiles extensions with -std=c++17, newer ones with -std=c++20 (test_cuda_compile.py checks that).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS_CPP = os.path.join(ROOT, "csrc", "ops.cpp")


def cpp_schemas() -> list[str]:
    """The m.def("...") schemas of TORCH_LIBRARY(hydra_kernels_C, m) in csrc/ops.cpp (adjacent literals joined)."""
    src = open(OPS_CPP).read()
    block = src[src.index("TORCH_LIBRARY(hydra_kernels_C, m)"):]
    block = block[:block.index("\n}")]
    return ["".join(re.findall(r'"((?:[^"\\]|\\.)*)"', call)) for call in re.findall(r"m\.def\((.*?)\);", block, re.S)]


_FAKES_SCRIPT = r"""
import json, sys
import torch
from hydra_kernels.kernels import cuda as ck
lib = torch.library.Library("hydra_kernels_C", "DEF")
for schema in json.loads(sys.argv[1]):
    lib.define(schema)
ck._register_fakes()
ops = torch.ops.hydra_kernels_C
m = dict(device="meta")
bf16, f32, i64 = torch.bfloat16, torch.float32, torch.int64
out = {}
x = torch.empty(2, 3, 7, dtype=bf16, **m)
t = torch.empty(6, dtype=i64, **m)
for name, ref in (("none", None), ("k3", torch.empty(2, 3, 7, dtype=bf16, **m))):
    res = ops.logprobs_fwd(x, ref, t, 0.7, 0 if ref is None else 3, -100, 64, 65535)
    out["fwd_" + name] = [[list(r.shape), str(r.dtype)] for r in res]
    logp, ref_logp, kl, ent, stats = res
    g = torch.empty(6, dtype=f32, **m)
    d = ops.logprobs_bwd(g, None if ref is None else g, None, x, ref, t, logp, ref_logp, kl, ent, stats, 0.7,
                         0 if ref is None else 3, -100, 64, 65535)
    out["bwd_" + name] = [list(d.shape), str(d.dtype)]
xs = torch.empty(5, 16, dtype=bf16, **m)
w = torch.empty(24, 16, dtype=bf16, **m)
A = torch.empty(2, 4, 16, dtype=bf16, **m)
B = torch.empty(2, 24, 4, dtype=bf16, **m)
y, xa = ops.lora_small_fwd(xs, w, None, A, B, [1.0, 2.0], [1], 1, 1)
out["lora"] = [[list(y.shape), str(y.dtype)], [list(xa.shape), str(xa.dtype)]]
print(json.dumps(out))
"""


def test_schemas_parse():
    names = [s.split("(")[0] for s in cpp_schemas()]
    assert names == ["logprobs_fwd", "logprobs_bwd", "lora_small_fwd"]


def test_fake_impls_match_the_cpp_schemas():
    import json
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", _FAKES_SCRIPT, json.dumps(cpp_schemas())], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    f32 = "torch.float32"
    assert got["fwd_none"] == [[[6], f32], [[0], f32], [[0], f32], [[0], f32], [[6, 4], f32]]
    assert got["fwd_k3"] == [[[6], f32], [[6], f32], [[6], f32], [[6], f32], [[6, 4], f32]]
    assert got["bwd_none"] == got["bwd_k3"] == [[2, 3, 7], "torch.bfloat16"]
    assert got["lora"] == [[[5, 24], "torch.bfloat16"], [[5, 4], f32]]


def test_ops_cpp_is_cxx17(tmp_path):
    from tests.kernels import test_cuda_compile as cc
    if cc.NVCC is None:
        pytest.skip(cc.NO_NVCC)
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"    # as in test_cuda_compile's builds
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd, why = cc._ops_cpp_cmd(str(tmp_path))
    if cmd is None:
        pytest.skip(f"ops.cpp not syntax-checked: {why}")
    cmd = [c for c in cmd if not c.startswith("-std=")]
    header_only = subprocess.run(cmd[:-1] + ["-std=c++17", "-x", "c++", "-"], input="#include <torch/library.h>\n",
                                 capture_output=True, text=True, timeout=600)
    if header_only.returncode != 0:
        pytest.skip("this torch's headers do not compile as C++17 (its extensions build as C++20)")
    res = subprocess.run(cmd + ["-std=c++17"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"ops.cpp as C++17:\n{res.stdout}\n{res.stderr[-4000:]}"
