"""CPU checks of the CUDA sources (csrc/) and their loader; nothing here needs a GPU.

* every csrc/*.cu compiles with the installed nvcc for sm_80 and sm_90 (the targets the build ships), warnings
  as errors (nvcc's all-warnings and the host compiler's -Wall -Wextra -Werror), with the macros torch's build
  adds, and includes no torch header;
* ptxas reports no spills and no stack frame for any kernel on either target (-Xptxas -v, parsed);
* the PTX of every kernel instance holds the instructions the design rests on: 16-byte global accesses in the
  log-prob kernels, cp.async + ldmatrix + mma.sync in the LoRA main kernel, 16-byte loads in its shrink, and
  the programmatic-dependent-launch pair (griddepcontrol) on sm_90 only;
* the host-side helpers link and run without a GPU: shared-memory sizes agree with the Python mirror used for
  dispatch, and the launchers reject bad launch shapes before touching the device;
* the launchers run against a stand-in for libcudart (cuda_host/fake_cudart.cpp) that enforces the runtime's launch
  rules (shared-memory opt-in per kernel and device, grid limits) and logs every launch;
* csrc/ops.cpp (the torch op registration) passes g++ -fsyntax-only against the installed torch's headers;
* cuda_build.py runs with torch and hydra_kernels unimportable (setup.py's situation) and has the right flags;
* hydra_kernels.kernels.cuda imports on a CPU machine without compiling, and says plainly why it cannot load;
* the log-prob kernels' row code (csrc/logprobs_row.cuh, shared with the device) is built for the host and each
  row's block is replayed thread by thread (the kernel's chunking, head/tail split and butterfly merge; 16-byte
  accesses checked for alignment): forward outputs, stats and dlogits against float64 and its autograd, for every
  dtype and KL mode, odd vocabularies, misaligned and differently aligned rows, -inf columns, ignored rows;
* the LoRA kernel's tile geometry (csrc/lora_small_tiles.cuh) is run on the host against an emulation of
  ldmatrix / mma.m16n8k16 written from the PTX ISA (fragment mapping, swizzle, bank conflicts).

Each source is compiled once per module (two at a time, for 2-core CI machines).
"""
from __future__ import annotations

import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import pytest
import torch

from hydra_kernels import reference
from tests._util import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "*.cu")))
OPS_CPP = os.path.join(CSRC, "ops.cpp")
# torch.utils.cpp_extension adds these to every nvcc command: the sources must compile with them.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]
# Kernels each file must define (a refactor that drops one should fail here, not on the GPU machine).
EXPECTED_KERNELS = {
    "logprobs.cu": ["logprobs_fwd_kernel", "logprobs_bwd_kernel"],
    "lora_linear_small.cu": ["lora_small_main_kernel", "lora_shrink_kernel"],
}


def _find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else None


NVCC = _find_nvcc()
NO_NVCC = "nvcc not found (no CUDA toolkit on PATH / CUDA_HOME): the CUDA sources were not compiled"


def _toolkit_dirs() -> tuple[str | None, str | None]:
    """(include dir with cuda_runtime_api.h, lib dir with libcudart) of the toolkit nvcc belongs to. Asks nvcc
    (--dryrun prints its INCLUDES/LIBRARIES), since `nvcc` on PATH may be a wrapper script outside the toolkit."""
    if NVCC is None:
        return None, None
    res = subprocess.run([NVCC, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                         capture_output=True, text=True, timeout=60)
    text = res.stdout + res.stderr
    incs = re.findall(r'-I"?([^"\s]+)', " ".join(l for l in text.splitlines() if "INCLUDES=" in l))
    libs = re.findall(r'-L"?([^"\s]+)', " ".join(l for l in text.splitlines() if "LIBRARIES=" in l))
    home = os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))
    incs.append(os.path.join(home, "include"))
    libs += [os.path.join(home, "lib64"), os.path.join(home, "lib")]
    inc = next((d for d in incs if os.path.exists(os.path.join(d, "cuda_runtime_api.h"))), None)
    lib = next((d for d in libs if glob.glob(os.path.join(d, "libcudart.so*"))), None)
    return inc, lib


TOOLKIT_INCLUDE, TOOLKIT_LIB = _toolkit_dirs()


def _cuda_include():
    return TOOLKIT_INCLUDE


ARCHS = ("80", "90")      # what kernels/cuda_build.py ships SASS for (test_cuda_build_flags checks the build)


def _nvcc_cmd(src: str, obj: str) -> list[str]:
    return [NVCC, "-c", src, "-o", obj, "-std=c++17", "-O3",
            *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS),
            "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror", "-Xptxas", "-v",
            *TORCH_NVCC_DEFINES, "-I", CSRC]


def _ptx_cmd(src: str, out: str, arch: str) -> list[str]:
    return [NVCC, "-ptx", src, "-o", out, "-std=c++17", "-O3", f"-arch=compute_{arch}", *TORCH_NVCC_DEFINES,
            "-I", CSRC]


def _ops_cpp_cmd(shim_dir: str):
    """g++ -fsyntax-only for ops.cpp, or (None, reason to skip)."""
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        return None, "no host C++ compiler (g++) found"
    from torch.utils import cpp_extension
    torch_inc = cpp_extension.include_paths()
    if not os.path.exists(os.path.join(torch_inc[0], "torch", "library.h")):
        return None, "this torch wheel ships no C++ headers (torch/include/torch/library.h missing)"
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        return None, "CUDA runtime headers (cuda_runtime_api.h) not found next to nvcc"
    std = "-std=c++20" if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 10) else "-std=c++17"
    cmd = [gxx, "-fsyntax-only", std, "-Wall", "-Wextra", "-Werror", "-DTORCH_EXTENSION_NAME=_C"]
    for inc in torch_inc + [shim_dir, cuda_inc, sysconfig.get_paths()["include"]]:
        cmd += ["-isystem", inc]        # warnings inside torch's own headers are not ours
    return cmd + ["-I", CSRC, OPS_CPP], None


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Compiles every .cu (and syntax-checks ops.cpp) once, two jobs at a time. -> {name: result}."""
    if NVCC is None:
        pytest.skip(NO_NVCC)
    out = tmp_path_factory.mktemp("nvcc")
    # CPU-only torch wheels omit c10/cuda/impl/cuda_cmake_macros.h (generated at torch's build); a CUDA build has
    # it with exactly this content. Only the syntax check uses the shim.
    shim = out / "shim"
    (shim / "c10" / "cuda" / "impl").mkdir(parents=True)
    (shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    jobs = {os.path.basename(f): (_nvcc_cmd(f, str(out / (os.path.basename(f) + ".o"))), None) for f in CU_FILES}
    for f in CU_FILES:
        for arch in ARCHS:
            name = f"{os.path.basename(f)}.{arch}.ptx"
            jobs[name] = (_ptx_cmd(f, str(out / name), arch), None)
    ops_cmd, ops_skip = _ops_cpp_cmd(str(shim))
    if ops_cmd is not None:
        jobs["ops.cpp"] = (ops_cmd, None)
    results = {"ops.cpp": ops_skip} if ops_cmd is None else {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futs = {name: pool.submit(subprocess.run, cmd, capture_output=True, text=True, timeout=600)
                for name, (cmd, _) in jobs.items()}
        for name, fut in futs.items():
            results[name] = fut.result()
    results["_objdir"] = str(out)
    return results


def _compiled(builds, name):
    res = builds[name]
    assert res.returncode == 0, f"{name} failed to compile:\n{res.stdout}\n{res.stderr}"
    return res


def test_sources_present():
    assert {os.path.basename(f) for f in CU_FILES} >= set(EXPECTED_KERNELS), CU_FILES
    assert os.path.exists(OPS_CPP)


@pytest.mark.parametrize("name", [os.path.basename(f) for f in CU_FILES])
def test_cu_is_pure_cuda(name):
    """The kernels take raw pointers: no torch/ATen/c10 header in any .cu or the shared header."""
    for path in [os.path.join(CSRC, name), os.path.join(CSRC, "hydra_kernels.h")]:
        includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', open(path).read(), flags=re.M)
        bad = [i for i in includes if i.split("/")[0] in ("torch", "ATen", "c10", "pybind11", "Python.h")]
        assert not bad, f"{path} includes {bad}"


@pytest.mark.parametrize("name", [os.path.basename(f) for f in CU_FILES])
def test_cu_compiles_sm80_sm90_werror(builds, name):
    _compiled(builds, name)


def _ptxas_report(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(arch, mangled kernel): {registers, stack, spill_stores, spill_loads}} from `-Xptxas -v` output."""
    report, current = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'", line)
        if m:
            current = (m.group(2), m.group(1))
            report[current] = {}
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            report[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            report[current]["registers"] = int(m.group(1))
    return report


@pytest.mark.parametrize("name", sorted(EXPECTED_KERNELS))
def test_no_spills(builds, name):
    res = _compiled(builds, name)
    report = _ptxas_report(res.stdout + res.stderr)
    for arch in ARCHS:
        for kernel in EXPECTED_KERNELS[name]:
            assert any(a == arch and kernel in k for a, k in report), f"{kernel} not in the sm_{arch} report of {name}"
    assert report, f"no ptxas -v output for {name}"
    for kernel, info in report.items():
        assert info.get("spill_stores") == 0 and info.get("spill_loads") == 0, f"{name}: {kernel} spills: {info}"
        assert info.get("stack") == 0, f"{name}: {kernel} uses a stack frame (local memory): {info}"
        assert 0 < info.get("registers", 0) <= 255, f"{name}: {kernel}: {info}"


# Per kernel: PTX patterns every instance must contain ({arch: patterns}; "!" = must not contain).
PTX_FEATURES = {
    "logprobs_fwd_kernel": {"80": [r"ld\.global[.a-z]*\.v4\."], "90": [r"ld\.global[.a-z]*\.v4\."]},
    "logprobs_bwd_kernel": {a: [r"ld\.global[.a-z]*\.v4\.", r"st\.global[.a-z]*\.v4\."] for a in ARCHS},
    "lora_small_main_kernel": {
        "80": [r"cp\.async\.cg\.shared\.global", r"ldmatrix\.sync", r"mma\.sync\.aligned\.m16n8k16", "!griddepcontrol"],
        "90": [r"cp\.async\.cg\.shared\.global", r"ldmatrix\.sync", r"mma\.sync\.aligned\.m16n8k16",
               r"griddepcontrol\.wait"]},
    "lora_shrink_kernel": {"80": [r"ld\.global[.a-z]*\.v4\.", "!griddepcontrol"],
                           "90": [r"ld\.global[.a-z]*\.v4\.", r"griddepcontrol\.launch_dependents"]},
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(EXPECTED_KERNELS))
def test_ptx_has_the_designed_instructions(builds, name, arch):
    res = _compiled(builds, f"{name}.{arch}.ptx")
    ptx = open(os.path.join(builds["_objdir"], f"{name}.{arch}.ptx")).read()
    entries = re.split(r"^\.(?:visible )?\.?entry ", ptx, flags=re.M)[1:]
    assert entries, f"no kernels in the PTX of {name}: {res.stderr}"
    seen = set()
    for body in entries:
        mangled = body.split("(", 1)[0]
        kernel = next((k for k in PTX_FEATURES if k in mangled), None)
        assert kernel is not None, f"{name}: kernel {mangled} has no expected PTX features listed"
        seen.add(kernel)
        for pat in PTX_FEATURES[kernel][arch]:
            if pat.startswith("!"):
                assert pat[1:] not in body, f"{name} sm_{arch}: {mangled} contains {pat[1:]}"
            else:
                assert re.search(pat, body), f"{name} sm_{arch}: {mangled} lacks /{pat}/"
    assert seen == set(EXPECTED_KERNELS[name])


def test_ops_cpp_syntax(builds):
    res = builds["ops.cpp"]
    if isinstance(res, str) or res is None:
        pytest.skip(f"ops.cpp not syntax-checked: {res}")
    assert res.returncode == 0, f"ops.cpp:\n{res.stdout}\n{res.stderr}"


HOST_MAIN = textwrap.dedent("""
    #include <cstdio>
    #include "hydra_kernels.h"
    int main() {
      // shared memory per block (rows, rank, used adapters, block_m_warps)
      const int cases[][4] = {{1, 0, 0, 1}, {16, 16, 2, 1}, {33, 7, 1, 1}, {64, 64, 2, 1}, {128, 64, 2, 2},
                              {128, 128, 4, 1}, {100, 8, 3, 2}};
      for (const auto& c : cases)
        std::printf("smem %d %d %d %d %zu\\n", c[0], c[1], c[2], c[3], hydra::lora_small_smem_bytes(c[0], c[1], c[2], c[3]));
      for (int r : {1, 16, 17, 32, 64, 65, 128, 129}) std::printf("rows %d %d\\n", r, hydra::lora_small_rows_per_block(r));
      std::printf("ws %zu\\n", hydra::lora_small_workspace_floats(4096, 16, 1, 8));
      // bad launch shapes are rejected before any CUDA call (no device needed)
      hydra::LogprobsFwdArgs f{};
      f.threads = 48; f.max_blocks = 1; f.B = 1; f.T = 1; f.V = 8;
      std::printf("fwd_threads %d\\n", (int)hydra::logprobs_forward(f, nullptr));
      f.threads = 64; f.kl_mode = hydra::kKlK3;   // a KL mode without ref_logits
      std::printf("fwd_ref %d\\n", (int)hydra::logprobs_forward(f, nullptr));
      hydra::LogprobsBwdArgs b{};
      b.threads = 64; b.max_blocks = 1; b.B = 1; b.T = 1; b.V = 8; b.kl_mode = hydra::kKlFull;
      float g = 0.f; b.grad_kl = &g;              // full-KL gradient without ref_logits
      std::printf("bwd_ref %d\\n", (int)hydra::logprobs_backward(b, nullptr));
      hydra::LoraSmallArgs l{};
      l.dtype = hydra::DType::kBFloat16; l.R = 6; l.N = 8; l.K = 12; l.n_streams = 2; l.block_m_warps = 1; l.splits = 1;
      std::printf("lora_k %d\\n", (int)hydra::lora_small_forward(l, nullptr));      // K % 8 != 0
      l.K = 16; l.R = 7;
      std::printf("lora_streams %d\\n", (int)hydra::lora_small_forward(l, nullptr)); // 7 rows, 2 streams
      l.R = 130; l.n_streams = 2;
      std::printf("lora_rows %d\\n", (int)hydra::lora_small_forward(l, nullptr));    // > 128 rows
      l.R = 8; l.dtype = hydra::DType::kFloat32;
      std::printf("lora_f32 %d\\n", (int)hydra::lora_small_forward(l, nullptr));
      return 0;
    }
""")


def test_host_helpers_without_gpu(builds, tmp_path):
    """Links the compiled objects into a host program: layout sizes match the Python mirror used by dispatch,
    and invalid launches return cudaErrorInvalidValue (1) without a device."""
    for name in EXPECTED_KERNELS:
        _compiled(builds, name)
    gxx = shutil.which("g++") or shutil.which("c++")
    cuda_inc, libdir = TOOLKIT_INCLUDE, TOOLKIT_LIB
    if gxx is None or cuda_inc is None or libdir is None:
        pytest.skip("no g++ or no libcudart next to nvcc: the host helpers were not linked")
    main = tmp_path / "main.cpp"
    main.write_text(HOST_MAIN)
    exe = tmp_path / "host_helpers"
    objs = [os.path.join(builds["_objdir"], n + ".o") for n in sorted(EXPECTED_KERNELS)]
    link = subprocess.run([gxx, "-std=c++17", "-I", CSRC, "-isystem", cuda_inc, str(main), *objs, "-L", libdir,
                           "-lcudart", f"-Wl,-rpath,{libdir}", "-o", str(exe)], capture_output=True, text=True)
    assert link.returncode == 0, link.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.split("\n")
    from hydra_kernels.kernels import cuda as ck
    for line in lines:
        parts = line.split()
        if parts and parts[0] == "smem":
            rows, rank, used, mw, got = map(int, parts[1:])
            assert ck._smem_bytes(rows, rank, used, mw) == got, line
        elif parts and parts[0] == "rows":
            assert ck._rows_per_block(int(parts[1])) == int(parts[2]), line
    out = dict(p.split() for p in lines if p and p.split()[0] not in ("smem", "rows"))
    assert out["ws"] == str(8 * 64 * 64 * 16)
    for key in ("fwd_threads", "fwd_ref", "bwd_ref", "lora_k", "lora_streams", "lora_rows", "lora_f32"):
        assert out[key] == "1", f"{key}: expected cudaErrorInvalidValue (1), got {out[key]}"


def test_launchers_on_a_fake_runtime(builds, tmp_path):
    """The host launchers of csrc/*.cu run for real against a stand-in for libcudart (cuda_host/fake_cudart.cpp)
    that enforces the runtime's launch rules and logs every launch: a process that meets several LoRA shapes,
    both 16-bit dtypes and two devices opts every main-kernel instantiation into its > 48 KiB of shared memory
    (the opt-in is per instantiation, so a second shape never fails with 'invalid argument'); PDL only on sm_90 and only behind the shrink kernel; split-K clamped to the K tiles; log-prob
    grids on axis x, capped at max_blocks."""
    for name in EXPECTED_KERNELS:
        _compiled(builds, name)
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None or TOOLKIT_INCLUDE is None:
        pytest.skip("no g++ or no CUDA runtime headers: the launchers were not linked")
    host_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_host")
    exe = tmp_path / "launch_host"
    objs = [os.path.join(builds["_objdir"], n + ".o") for n in sorted(EXPECTED_KERNELS)]
    link = subprocess.run([gxx, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", CSRC, "-isystem", TOOLKIT_INCLUDE,
                           os.path.join(host_dir, "launch_host.cpp"), os.path.join(host_dir, "fake_cudart.cpp"),
                           *objs, "-o", str(exe)], capture_output=True, text=True, timeout=300)
    assert link.returncode == 0, link.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    calls, launches, pending = {}, {}, []
    for line in run.stdout.splitlines():
        parts = line.split()
        if parts[0] == "launch":
            f = dict(zip(parts[2::2], parts[3::2]))
            kernel = next(k for ks in EXPECTED_KERNELS.values() for k in ks if k in parts[1])
            pending.append(dict(kernel=kernel, dev=int(parts[3]), grid=tuple(map(int, parts[5:8])),
                                smem=int(f["smem"]), pdl=int(f["pdl"]), rc=int(f["rc"])))
        elif parts[0] == "call":
            calls[parts[1]], launches[parts[1]], pending = int(parts[2]), pending, []
    assert calls and all(rc == 0 for rc in calls.values()), run.stdout
    for label, ls in launches.items():
        assert all(l["rc"] == 0 for l in ls), (label, ls)
    names = lambda label: [l["kernel"] for l in launches[label]]  # noqa: E731
    # LoRA: the shrink precedes the main kernel when an adapter is used or split-K needs its counters zeroed;
    # the main kernel is its programmatic dependent on sm_90 (device 0) and an ordinary launch on sm_80 (device 1).
    for label in ("lora_bf16_r128_mw2", "lora_fp16_r128_mw2", "lora_bf16_r128_mw1", "lora_bf16_splitk",
                  "lora_bf16_splitk_base"):
        assert names(label) == ["lora_shrink_kernel", "lora_small_main_kernel"], label
        assert launches[label][1]["pdl"] == 1, label
    for label in ("lora_bf16_r64_mw1", "lora_bf16_one_ktile", "lora_dev1_bf16_r64_mw1"):
        assert names(label) == ["lora_small_main_kernel"] and launches[label][0]["pdl"] == 0, label
    assert launches["lora_dev1_bf16_r128_mw1"][1]["pdl"] == 0
    assert all(l["smem"] > 48 * 1024 for label in ("lora_bf16_r64_mw1", "lora_fp16_r128_mw2", "lora_bf16_r128_mw1",
                                                    "lora_dev1_bf16_r64_mw1") for l in launches[label][-1:])
    assert launches["lora_bf16_splitk"][1]["grid"] == (1024 // 64 * 8, 1, 1)        # 16 tiles x 8 K splits
    assert launches["lora_bf16_one_ktile"][0]["grid"] == (256 // 64, 1, 1)          # K = 64: one split
    # Log-probs: one block per row up to max_blocks, on grid axis x only.
    assert launches["logprobs_fwd_3e9_rows"][0]["grid"] == (2147483647, 1, 1)
    assert launches["logprobs_bwd_140k_rows"][0]["grid"] == (65535, 1, 1)


# --------------------------------------------------------------------------------------- build helper
def test_cuda_build_needs_no_torch():
    """setup.py runs cuda_build.py before anything is installed: it must not import torch or hydra_kernels."""
    code = textwrap.dedent(f"""
        import json, os, runpy, sys
        sys.modules['torch'] = None            # any `import torch` now raises ImportError
        sys.modules['hydra_kernels'] = None
        os.chdir({ROOT!r})
        os.environ.pop('HYDRA_KERNELS_CUDA_ARCHS', None)
        os.environ['HYDRA_KERNELS_PTXAS_VERBOSE'] = '1'
        mod = runpy.run_path(os.path.join('hydra_kernels', 'kernels', 'cuda_build.py'))
        print(json.dumps(dict(setup=mod['extension_kwargs'](), jit=mod['jit_kwargs']())))
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    import json
    kw = json.loads(res.stdout)
    setup, jit = kw["setup"], kw["jit"]
    assert sorted(setup["sources"]) == sorted(
        [os.path.relpath(f, ROOT) for f in CU_FILES] + [os.path.relpath(OPS_CPP, ROOT)])
    assert all(not os.path.isabs(s) for s in setup["sources"])            # setuptools wants relative paths
    assert all(os.path.isabs(s) and os.path.exists(s) for s in jit["sources"])
    nvcc = setup["extra_compile_args"]["nvcc"]
    assert nvcc == jit["extra_cuda_cflags"]
    assert "-gencode=arch=compute_80,code=sm_80" in nvcc and "-gencode=arch=compute_90,code=sm_90" in nvcc
    assert "-gencode=arch=compute_90,code=compute_90" in nvcc             # PTX for newer GPUs
    assert "-O3" in nvcc and ["-Xptxas", "-v"] == nvcc[-2:]
    flat = " ".join(nvcc + setup["extra_compile_args"]["cxx"])
    for banned in ("use_fast_math", "-ftz=true", "prec-div=false", "prec-sqrt=false", "-std="):
        assert banned not in flat, f"{banned} in {flat}"


def test_cuda_build_arch_override(monkeypatch):
    from hydra_kernels.kernels import cuda_build
    monkeypatch.setenv("HYDRA_KERNELS_CUDA_ARCHS", "9.0;8.0+PTX")
    assert cuda_build.gencode_flags() == ["-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80",
                                          "-gencode=arch=compute_90,code=compute_90"]
    monkeypatch.setenv("HYDRA_KERNELS_CUDA_ARCHS", "sm_90")
    with pytest.raises(ValueError, match="HYDRA_KERNELS_CUDA_ARCHS"):
        cuda_build.gencode_flags()
    monkeypatch.delenv("HYDRA_KERNELS_CUDA_ARCHS")
    h = cuda_build.source_hash("a")
    assert h == cuda_build.source_hash("a") and h != cuda_build.source_hash("b")


# --------------------------------------------------------------------------------------------- loader
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_loader_without_gpu_is_lazy_and_plain():
    code = textwrap.dedent("""
        import torch, hydra_kernels.kernels.cuda as ck
        assert not ck._loaded and ck._error is None          # importing compiled nothing
        assert ck.is_available() is False
        print(ck.unavailable_reason())
        x = torch.zeros(2, 3, 8, dtype=torch.bfloat16)
        t = torch.zeros(6, dtype=torch.long)
        try:
            ck.logprobs_and_kl_forward(x, None, t, 1.0, "none", -100)
        except ValueError as e:
            print("VE", e)
        try:
            ck.logprobs_and_kl_forward(x, None, t, 1.0, "k9", -100)
        except ValueError as e:
            print("VE", e)
        if torch.version.cuda is None:
            try:
                ck.load()
            except RuntimeError as e:
                print("RE", e)
        assert not ck._loaded
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": ROOT})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "needs CUDA tensors" in out and "unknown mode 'k9'" in out
    if torch.version.cuda is None:
        assert "CPU-only" in out and "RE hydra_kernels: the CUDA extension is not built by setup.py" in out


def test_backend_cuda_on_cpu_tensors_is_a_value_error():
    from hydra_kernels.ops import lora_linear
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match="cuda"):
        lora_linear(x, torch.randn(8, 16), backend="cuda")


# -------------------------------------------------------------------------------------- dispatch rule
def test_lora_dispatch_rule(monkeypatch):
    from hydra_kernels.ops.lora_linear import CUDA_AUTO_ENV, _gpu_default
    cuda = torch.device("cuda", 0)
    kw = dict(n_streams=2, dtype=torch.bfloat16, in_features=4096, n_adapters_used=1, device=cuda)
    # Until the kernel has run on a GPU, `auto` picks it only when asked to.
    monkeypatch.delenv(CUDA_AUTO_ENV, raising=False)
    assert _gpu_default(8, 16, **kw) == "triton"
    monkeypatch.setenv(CUDA_AUTO_ENV, "0")
    assert _gpu_default(8, 16, **kw) == "triton"
    monkeypatch.setenv(CUDA_AUTO_ENV, "1")
    assert _gpu_default(8, 16, **{**kw, "device": torch.device("cpu")}) == "triton"
    assert _gpu_default(8, 16, **kw, needs_grad=True) == "triton"             # forward-only kernel
    assert _gpu_default(65, 16, **kw) == "triton"                             # > 64 rows per stream
    assert _gpu_default(48, 16, **{**kw, "n_streams": 3}) == "triton"         # > 128 rows in all
    assert _gpu_default(8, 16, **{**kw, "dtype": torch.float32}) == "triton"  # no fp32 tensor-core path
    assert _gpu_default(8, 16, **{**kw, "in_features": 4100}) == "triton"     # K % 8
    assert _gpu_default(8, 256, **kw) == "triton"                             # rank > 128
    # Where the kernel applies, `cuda` iff the extension can run here.
    from hydra_kernels.kernels import cuda as ck
    expected = "cuda" if ck.unavailable_reason() is None else "triton"
    assert _gpu_default(8, 16, **kw) == expected


def test_lora_small_config_one_wave():
    from hydra_kernels.kernels.cuda import lora_small_config
    mw, splits = lora_small_config(16, 4096, 4096, 16, 2, sm_count=132, smem_optin=227 * 1024)
    assert mw == 1 and 64 * splits <= 132 * 4 and splits > 1      # split-K fills the GPU in one wave
    mw, splits = lora_small_config(128, 4096, 4096, 16, 2, sm_count=132, smem_optin=227 * 1024)
    assert mw == 2 and splits >= 1
    # A100's 163 KiB: 128 rows with two rank-64 adapters do not fit 128-feature blocks; 64-feature ones do.
    assert lora_small_config(128, 4096, 4096, 64, 2, sm_count=108, smem_optin=166912)[0] == 1
    assert lora_small_config(129, 4096, 4096, 16, 1) is None
    assert lora_small_config(1, 8, 8, 0, 0) == (1, 1)
    assert lora_small_config(16, 0, 4096, 16, 1)[0] == 1          # out_features 0 (was ZeroDivisionError)


SMEM_OPTINS = {"sm_86/sm_89": 99 * 1024, "A100": 163 * 1024, "H100": 227 * 1024}


@pytest.mark.parametrize("device", sorted(SMEM_OPTINS))
def test_lora_small_supported_iff_a_config_fits(device):
    """lora_small_supported (what dispatch asks) says yes exactly where lora_linear_forward finds a configuration
    (lora_small_config) within the device's own shared memory, 99 KiB parts (A10, L4, L40S, RTX 30xx/40xx) as
    well as 163 KiB ones, so `auto` never picks a shape the launcher refuses."""
    from hydra_kernels.kernels.cuda import lora_small_config, lora_small_supported
    optin = SMEM_OPTINS[device]
    seen = set()
    for S in range(1, 9):
        for m in (1, 3, 8, 16, 33, 64):
            for rank in (1, 8, 16, 24, 64, 128):
                for n_used in range(0, S + 1):
                    got = lora_small_supported(m, S, rank, torch.bfloat16, 4096, n_used, smem_optin=optin)
                    fits = S * m <= 128 and lora_small_config(S * m, 4096, 4096, rank if n_used else 0, n_used,
                                                              smem_optin=optin) is not None
                    assert got == fits, (S, m, rank, n_used)
                    seen.add(got)
    assert seen == {True, False}


def test_lora_small_supported_reads_the_current_device(monkeypatch):
    from hydra_kernels.kernels import cuda as ck
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for optin, want in ((99 * 1024, False), (227 * 1024, True)):
        monkeypatch.setattr(ck, "_sm_count_and_smem", lambda device, o=optin: (84, o))
        assert ck.lora_small_supported(64, 2, 16, torch.bfloat16, 4096, 1) is want      # 128 rows: ~100 KiB


def test_cuda_kernels_unavailable_below_sm80(monkeypatch):
    """The build ships sm_80/sm_90 code only: on a T4 or V100 every launch would fail with 'no kernel image', so
    the backend reports itself unavailable (and `auto` keeps to Triton) instead of building and failing later."""
    from hydra_kernels.kernels import cuda as ck
    if ck._loaded:
        pytest.skip("the extension is loaded in this process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0) if i == 0 else (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla T4")

    def no_build():
        raise AssertionError("load() must not be attempted")

    monkeypatch.setattr(ck, "load", no_build)
    reason = ck.unavailable_reason()
    assert reason is not None and "cuda:1" in reason and "compute capability 7.5" in reason


# ------------------------------------------------------------------ log-prob kernel math, replayed on the CPU
HOST_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_host", "logprobs_host.cpp")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
KL_CODES = {"none": 0, "k1": 1, "k2": 2, "k3": 3, "full": 4}


@pytest.fixture(scope="module")
def logprobs_host(tmp_path_factory):
    """csrc/logprobs_row.cuh (the kernels' per-thread row code) built for the host, with a driver that replays
    each row's block thread by thread and reduces with the kernel's butterfly."""
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no host C++ compiler (g++)")
    if TOOLKIT_INCLUDE is None:
        pytest.skip("CUDA headers (cuda_bf16.h, cuda_fp16.h) not found: the row code was not built for the host")
    exe = str(tmp_path_factory.mktemp("lphost") / "logprobs_host")
    res = subprocess.run([gxx, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-DHK_HOST_CHECK_ALIGN",
                          "-I", CSRC, "-isystem",
                          TOOLKIT_INCLUDE, HOST_DRIVER, "-o", exe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return exe


def _host_run(exe, tmp_path, x_buf, r_buf, t, grads, *, dtype, kl, rows, V, sx, ox, sr, orr, threads, temperature,
              ignore_index=-100):
    import numpy as np
    as_np = (lambda b: b.view(torch.int16).numpy()) if dtype != torch.float32 else (lambda b: b.numpy())
    with open(tmp_path / "in.bin", "wb") as f:
        f.write(as_np(x_buf).tobytes())
        if r_buf is not None:
            f.write(as_np(r_buf).tobytes())
        f.write(t.numpy().astype(np.int64).tobytes())
        for g in grads:
            if g is not None:
                f.write(g.numpy().astype(np.float32).tobytes())
    args = [exe, str(tmp_path), DTYPE_CODES[dtype], KL_CODES[kl], rows, V, sx, ox, sr, orr, threads, repr(temperature),
            int(grads[0] is not None), int(grads[1] is not None), int(grads[2] is not None), ignore_index]
    res = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"driver failed ({res.returncode}): {res.stderr}"
    raw = torch.from_numpy(np.fromfile(tmp_path / "out.bin", dtype=np.float32))
    outs = raw[:4 * rows].view(4, rows)
    stats = raw[4 * rows:8 * rows].view(rows, 4)
    dx = raw[8 * rows:].view(rows, V)
    return outs, stats, dx


HOST_CASES = [   # (dtype, V, sx_extra, off_x, off_r, threads): off_x != off_r (mod 16 B) takes the scalar path
    (torch.float32, 1001, 0, 0, 0, 64),
    (torch.float32, 7, 3, 1, 1, 32),
    (torch.bfloat16, 1001, 0, 3, 3, 64),
    (torch.bfloat16, 4099, 5, 0, 5, 256),        # actor and reference rows differently aligned
    (torch.bfloat16, 8, 0, 0, 0, 32),
    (torch.bfloat16, 1, 0, 0, 0, 32),
    (torch.float16, 515, 2, 7, 7, 96),
    (torch.float16, 2053, 0, 0, 1, 128),
]


@pytest.mark.parametrize("kl", ["none", "k1", "k2", "k3", "full"])
@pytest.mark.parametrize("case", HOST_CASES)
def test_logprobs_row_code_on_host(logprobs_host, tmp_path, kl, case):
    """Forward outputs, stats and dlogits of the kernels' row code (all alignments, vector/scalar paths, -inf
    columns, ignored rows, a bad target, temperature) against the float64 reference and its autograd."""
    dtype, V, sx_extra, ox, orr, threads = case
    rows, temperature = 6, 0.7
    sx = sr = V + sx_extra
    gen = torch.Generator().manual_seed(V * 31 + ox)

    def buf(off):
        b = (torch.randn(off + rows * sx, generator=gen) * 3).to(dtype)
        if V > 4:                                 # masked vocabulary entries in every row
            for row in range(rows):
                b[off + row * sx + 2] = float("-inf")
                b[off + row * sx + V - 1] = float("-inf")
        return b

    x_buf = buf(ox)
    r_buf = None if kl == "none" else buf(orr)
    t = torch.randint(0, V, (rows,), generator=gen)
    if V > 4:
        t = torch.where((t == 2) | (t == V - 1), torch.zeros_like(t), t)
    t[1] = -100                                   # ignored
    t[4] = V + 3 if kl == "none" else t[4]        # out of range -> NaN
    grads = [torch.randn(rows, generator=gen), None if kl == "none" else torch.randn(rows, generator=gen),
             None if kl == "none" else torch.randn(rows, generator=gen)]
    outs, stats, dx = _host_run(logprobs_host, tmp_path, x_buf, r_buf, t, grads, dtype=dtype, kl=kl, rows=rows, V=V,
                                sx=sx, ox=ox, sr=sr, orr=orr, threads=threads, temperature=temperature)

    def rows_of(b, off):
        return torch.stack([b[off + i * sx: off + i * sx + V] for i in range(rows)]).double()

    # The reference runs on the unmasked columns only: softmax over them is the same, and autograd through
    # reference's where(p > 0, ...) would give NaN at -inf columns. Masked columns get gradient 0.
    keep = torch.tensor([c for c in range(V) if V <= 4 or c not in (2, V - 1)])
    new_index = torch.full((V,), -100, dtype=torch.long)
    new_index[keep] = torch.arange(len(keep))
    x = rows_of(x_buf, ox)[:, keep].requires_grad_(True)
    r = None if r_buf is None else rows_of(r_buf, orr)[:, keep]
    good = (t != -100) & (t >= 0) & (t < V)
    tt = torch.where(good, new_index[t.clamp(0, V - 1)], torch.full_like(t, -100))
    if kl == "none":
        ref = (reference.token_logprobs(x, tt, temperature),)
    else:
        ref = reference.logprobs_and_kl(x, r, tt, temperature, kl)
    names = ("logp", "ref_logp", "kl", "entropy")
    for k, want in enumerate(ref):
        got = outs[k]
        assert torch.all(got[t == -100] == 0), names[k]
        err = rel_err(got[good], want.detach()[good])
        assert err < 2e-5, f"{names[k]}: relative error {err:.3g}"
    if kl == "none":
        assert torch.isnan(outs[0][4]) and torch.all(outs[1:] == 0)
    assert torch.all(stats[t == -100] == 0)
    z = (x.detach().float() * torch.tensor(1.0 / temperature, dtype=torch.float32))
    assert torch.equal(stats[good, 0], z.amax(-1)[good])              # the row max is exact
    # backward: autograd through the reference, with the same upstream weights (on the valid rows)
    loss = (ref[0] * grads[0].double() * good).sum()
    if kl != "none":
        loss = loss + (ref[2] * grads[1].double() * good).sum() + (ref[3] * grads[2].double() * good).sum()
    (want,) = torch.autograd.grad(loss, x)
    assert torch.all(dx[t == -100] == 0)
    if V > 4:
        assert torch.all(dx[good][:, [2, V - 1]] == 0)
    err = rel_err(dx[good][:, keep], want[good])
    assert err < {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype], f"dlogits: {err:.3g}"



# ------------------------------------------------------- LoRA kernel fragment mapping, against emulated PTX
def test_lora_fragment_mapping_on_host(tmp_path):
    """csrc/lora_small_tiles.cuh (every shared-memory address and accumulator coordinate the kernel uses) driven
    through an emulation of ldmatrix / mma.m16n8k16 written from the PTX ISA: all block configurations of the
    main loop and the LoRA expand give W·xᵀ (resp. B·xaᵀ with the adapter mask) at the coordinates the kernel
    writes, and no ldmatrix phase has a bank conflict."""
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no host C++ compiler (g++)")
    exe = str(tmp_path / "lora_tiles_host")
    src = os.path.join(os.path.dirname(HOST_DRIVER), "lora_tiles_host.cpp")
    res = subprocess.run([gxx, "-O2", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-I", CSRC, src, "-o", exe],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    run = subprocess.run([exe], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr
