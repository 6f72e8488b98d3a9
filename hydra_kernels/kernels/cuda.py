"""The csrc/ CUDA kernels: loading the extension and calling it.

Loading, at first use (never at import, so CPU machines import this freely):
  1. `import hydra_kernels._C`, built by setup.py (`pip install --no-build-isolation .` on a CUDA machine);
  2. else a just-in-time build with ninja (torch.utils.cpp_extension.load) into
     $HYDRA_KERNELS_CACHE or ~/.cache/hydra_kernels/<hash of sources, flags, torch/CUDA/Python versions>,
     reused by every later process (a file lock guards concurrent builds);
  3. else a RuntimeError that says why: a CPU-only torch, no CUDA toolkit (CUDA_HOME / nvcc), no ninja, no csrc/
     sources next to the package, or the compiler's output.
The ops are registered as torch.ops.hydra_kernels_C.* (csrc/ops.cpp); their fake (meta) implementations for
torch.compile are registered here, once the library is loaded.

The Python functions below have the launcher signatures of the Triton backend (same arguments, same outputs,
same stats layout), so the ops in hydra_kernels.ops call either backend unchanged:
  logprobs_and_kl_forward / logprobs_and_kl_backward   contract: hydra_kernels/kernels/triton/logprobs.py
                                                       (ref_logits=None with kl="none" is token_logprobs)
  lora_linear_forward                                  contract: hydra_kernels/ops/lora_linear.py (forward only;
                                                       the backward is Triton's)
Keyword-only arguments (threads, max_blocks, block_m_warps, splits) override the launch heuristics for tuning.
"""
from __future__ import annotations

import math
import os
import sys
import threading
import warnings

import torch

from hydra_kernels.kernels.kl import kl_mode

__all__ = [
    "load", "is_available", "unavailable_reason",
    "logprobs_and_kl_forward", "logprobs_and_kl_backward",
    "lora_linear_forward", "lora_small_supported", "lora_small_config",
]

LOGPROB_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LORA_DTYPES = (torch.bfloat16, torch.float16)

# Limits of csrc/lora_linear_small.cu (kLoraMax* in csrc/hydra_kernels.h).
LORA_MAX_STREAMS = 8
LORA_MAX_ROWS = 128
LORA_MAX_RANK = 128

_lock = threading.Lock()
_loaded = False
_error: str | None = None
_warned = False


# ------------------------------------------------------------------------------------------------ loading
def _cache_root() -> str:
    return os.environ.get("HYDRA_KERNELS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hydra_kernels")


def _why_not_buildable() -> str | None:
    """Why a JIT build cannot work here, or None. Cheap: looks at versions and files, compiles nothing."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found: set CUDA_HOME or put nvcc on PATH"
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    if not os.path.exists(nvcc):
        return f"nvcc not found at {nvcc} (CUDA_HOME={cpp_extension.CUDA_HOME})"
    from hydra_kernels.kernels import cuda_build
    missing = [p for p in cuda_build.source_files() if not os.path.exists(p)]
    if missing:
        return (f"the csrc/ sources are not next to the package (missing {missing[0]}); use a source checkout, "
                "or build the extension with setup.py")
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed (pip install ninja)"
    return None


def _jit_build() -> None:
    from torch.utils import cpp_extension

    from hydra_kernels.kernels import cuda_build
    key = cuda_build.source_hash(extra=f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}")
    build_dir = os.path.join(_cache_root(), key)
    os.makedirs(build_dir, exist_ok=True)
    try:
        cpp_extension.load(name=f"hydra_kernels_C_{key}", build_directory=build_dir, with_cuda=True,
                           is_python_module=True, verbose=os.environ.get("HYDRA_KERNELS_VERBOSE_BUILD") == "1",
                           **cuda_build.jit_kwargs())
    except Exception as e:   # the compiler's output is in the message of cpp_extension's RuntimeError
        raise RuntimeError(f"hydra_kernels: just-in-time compilation of csrc/ failed (build directory "
                           f"{build_dir}):\n{e}") from e


def _import_or_build() -> None:
    prebuilt_error = None
    if os.environ.get("HYDRA_KERNELS_FORCE_JIT") != "1":
        try:
            import hydra_kernels._C  # noqa: F401  (registers torch.ops.hydra_kernels_C.*)
            return
        except ImportError as e:   # not built (the usual case), or built against another torch
            prebuilt_error = e
    reason = _why_not_buildable()
    if reason is not None:
        detail = "" if prebuilt_error is None or isinstance(prebuilt_error, ModuleNotFoundError) \
            else f" (hydra_kernels._C exists but does not load: {prebuilt_error})"
        raise RuntimeError("hydra_kernels: the CUDA extension is not built by setup.py and cannot be compiled "
                           f"just in time: {reason}{detail}")
    _jit_build()


def _register_fakes() -> None:
    """Shapes and dtypes of the outputs, for torch.compile / FakeTensor tracing."""
    lib = "hydra_kernels_C::"

    @torch.library.register_fake(lib + "logprobs_fwd")
    def _(logits, ref_logits, targets, temperature, kl_mode, ignore_index, threads, max_blocks):
        n = logits.shape[0] * logits.shape[1]
        n_ref = n if ref_logits is not None else 0
        f32 = dict(dtype=torch.float32)
        return (logits.new_empty(n, **f32), logits.new_empty(n_ref, **f32), logits.new_empty(n_ref, **f32),
                logits.new_empty(n_ref, **f32), logits.new_empty((n, 4), **f32))

    @torch.library.register_fake(lib + "logprobs_bwd")
    def _(grad_logp, grad_kl, grad_entropy, logits, ref_logits, targets, logp, ref_logp, kl, entropy, stats,
          temperature, kl_mode, ignore_index, threads, max_blocks):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(lib + "lora_small_fwd")
    def _(x, weight, bias, lora_A, lora_B, scaling, stream_adapters, block_m_warps, splits):
        return (x.new_empty((x.shape[0], weight.shape[0])),
                x.new_empty((x.shape[0], lora_A.shape[1]), dtype=torch.float32))


def load() -> None:
    """Make torch.ops.hydra_kernels_C.* available (import or JIT build). Raises RuntimeError saying why not."""
    global _loaded, _error
    if _loaded:
        return
    with _lock:
        if _loaded:
            return
        if _error is not None:
            raise RuntimeError(_error)
        try:
            _import_or_build()
            _register_fakes()
        except Exception as e:
            _error = str(e)
            raise RuntimeError(_error) from e
        _loaded = True


MIN_COMPUTE_CAPABILITY = (8, 0)   # sm_80 SASS (runs on 8.x) and compute_90 PTX: nothing runs on 7.x or older


def _old_device() -> str | None:
    """The first visible GPU the kernels have no code for (compute capability < 8.0), or None."""
    for i in range(torch.cuda.device_count()):
        cc = torch.cuda.get_device_capability(i)
        if tuple(cc) < MIN_COMPUTE_CAPABILITY:
            return (f"cuda:{i} ({torch.cuda.get_device_name(i)}) has compute capability {cc[0]}.{cc[1]}; the "
                    "kernels are built for 8.0 and newer (cp.async, bf16 mma.sync)")
    return None


def unavailable_reason() -> str | None:
    """None if the CUDA kernels can run here (loading them if needed), else why not."""
    if _loaded:
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)" if torch.version.cuda is not None \
            else f"torch {torch.__version__} is a CPU-only build"
    old = _old_device()
    if old is not None:
        return old
    try:
        load()
    except RuntimeError as e:
        return str(e)
    return None


@torch.compiler.assume_constant_result
def is_available() -> bool:
    """Whether the CUDA backend can run (compiles it on first call where it can). Never raises; for dispatch.
    Under torch.compile it runs once at trace time and its answer is a constant of the graph (no graph break
    on the loader's lock and file system work)."""
    global _warned
    reason = unavailable_reason()
    if reason is not None and torch.cuda.is_available() and not _warned:
        _warned = True
        warnings.warn(f"hydra_kernels: CUDA kernels unavailable, using Triton: {reason}", RuntimeWarning,
                      stacklevel=2)
    return reason is None


def _ops():
    load()
    return torch.ops.hydra_kernels_C


def _check_cuda(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cuda":
        raise ValueError(f"{name}: the cuda backend needs CUDA tensors, got one on {t.device}")


# ---------------------------------------------------------------------------------------------- log-probs
def _logprob_threads(V: int, dtype: torch.dtype) -> int:
    """One block per row: 256 threads for LM vocabularies; fewer where a row has few 16-byte vectors (each
    thread takes two vectors per step)."""
    vec = 4 if dtype == torch.float32 else 8
    per_step = math.ceil(V / vec / 2)
    return int(min(256, max(32, 32 * math.ceil(per_step / 32))))


# Blocks loop over rows beyond this grid (65 535, the limit every grid axis shares on older parts: the
# row loop then runs on every long sequence, which is what the tests at >= 65 536 rows check).
DEFAULT_MAX_BLOCKS = 65535


def _as_3d(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.dim() != 3:
        raise ValueError(f"{name}: expected [B, T, V], got shape {tuple(t.shape)}")
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def logprobs_and_kl_forward(logits: torch.Tensor, ref_logits: torch.Tensor | None, targets: torch.Tensor,
                            temperature: float, kl: str, ignore_index: int, *, threads: int | None = None,
                            max_blocks: int | None = None):
    """-> (logp, ref_logp, kl_out, entropy, stats); see hydra_kernels/kernels/triton/logprobs.py."""
    mode = kl_mode(kl)
    if (ref_logits is None) != (mode == 0):
        raise ValueError("kl: 'none' goes with ref_logits=None, and only with it")
    _check_cuda("logits", logits)
    logits = _as_3d("logits", logits)
    if logits.dtype not in LOGPROB_DTYPES:
        raise ValueError(f"logits: dtype {logits.dtype} not supported (expected one of {list(LOGPROB_DTYPES)})")
    if ref_logits is not None:
        _check_cuda("ref_logits", ref_logits)
        ref_logits = _as_3d("ref_logits", ref_logits)
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    threads = _logprob_threads(logits.shape[-1], logits.dtype) if threads is None else int(threads)
    max_blocks = DEFAULT_MAX_BLOCKS if max_blocks is None else int(max_blocks)
    return _ops().logprobs_fwd(logits, ref_logits, targets, float(temperature), mode, int(ignore_index),
                               threads, max_blocks)


def _grad(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape(-1).to(torch.float32).contiguous()


def logprobs_and_kl_backward(grad_logp: torch.Tensor | None, grad_kl: torch.Tensor | None,
                             grad_entropy: torch.Tensor | None, logits: torch.Tensor,
                             ref_logits: torch.Tensor | None, targets: torch.Tensor, logp: torch.Tensor,
                             ref_logp: torch.Tensor, kl_out: torch.Tensor, entropy: torch.Tensor,
                             stats: torch.Tensor, temperature: float, kl: str, ignore_index: int, *,
                             threads: int | None = None, max_blocks: int | None = None) -> torch.Tensor:
    """-> dlogits [B, T, V] contiguous in logits' dtype; see hydra_kernels/kernels/triton/logprobs.py."""
    mode = kl_mode(kl)
    if mode == 0:                     # no reference: only log-probs exist, nothing else can carry gradient
        grad_kl = grad_entropy = None
    if mode == 4 and grad_kl is not None and ref_logits is None:
        raise ValueError("ref_logits: needed by the backward of kl='full'")
    _check_cuda("logits", logits)
    logits = _as_3d("logits", logits)
    if ref_logits is not None:
        ref_logits = _as_3d("ref_logits", ref_logits)
    targets = targets.reshape(-1).to(torch.int64).contiguous()
    threads = _logprob_threads(logits.shape[-1], logits.dtype) if threads is None else int(threads)
    max_blocks = DEFAULT_MAX_BLOCKS if max_blocks is None else int(max_blocks)
    return _ops().logprobs_bwd(_grad(grad_logp), _grad(grad_kl), _grad(grad_entropy), logits, ref_logits, targets,
                               logp, ref_logp, kl_out, entropy, stats.contiguous(), float(temperature), mode,
                               int(ignore_index), threads, max_blocks)


# ------------------------------------------------------------------------------ small-batch LoRA linear
_STAGES, _BK = 4, 64          # mirror of csrc/lora_linear_small.cu (kStages, kBK)


def _rows_per_block(rows: int) -> int:
    for rb in (16, 32, 64, 128):
        if rows <= rb:
            return rb
    return 0


def _smem_bytes(rows: int, rank: int, n_used: int, block_m_warps: int) -> int:
    """Mirror of make_layout() in csrc/lora_linear_small.cu (shared memory per block)."""
    bn, rb = 64 * block_m_warps, _rows_per_block(rows)
    rank_pad = 16 * math.ceil(max(rank, 1) / 16)
    pitch = rank_pad + 8
    pipe = _STAGES * (bn + rb) * _BK * 2
    epi = (2 * rb * pitch * 2 if n_used else 0) + rb * (bn + 8) * 2
    region = 128 * math.ceil(max(pipe, epi) / 128)
    return region + n_used * bn * pitch * 2


_device_info: dict[int, tuple[int, int]] = {}


def _sm_count_and_smem(device: torch.device) -> tuple[int, int]:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _device_info:
        props = torch.cuda.get_device_properties(idx)
        optin = getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024
        _device_info[idx] = (props.multi_processor_count, int(optin))
    return _device_info[idx]


def lora_small_config(rows: int, out_features: int, in_features: int, rank: int, n_used: int,
                      sm_count: int = 132, smem_optin: int = 227 * 1024) -> tuple[int, int] | None:
    """(block_m_warps, splits) for a shape, or None where the kernel cannot take it.

    128 output features per block when a block carries 128 rows of x (x is re-read from L2 once per feature
    slice: R/BN of the W bytes, kept <= 1), else 64. K is split until the grid covers the resident blocks of
    every SM (at least 4 K-tiles of 64 per split): the kernel is bound by W bytes in flight per SM.
    """
    rb = _rows_per_block(rows)
    if rb == 0:
        return None
    for mw in ((2, 1) if rb >= 128 else (1,)):
        smem = _smem_bytes(rows, rank, n_used, mw)
        if smem + 1024 <= smem_optin:            # + the kernel's static shared memory
            break
    else:
        return None
    bn = 64 * mw
    tiles = max(1, math.ceil(out_features / bn))     # out_features == 0: nothing to split (no division by 0)
    k_tiles = math.ceil(in_features / _BK)
    per_sm = max(1, min(4, (228 * 1024) // (smem + 1024)))
    splits = sm_count * per_sm // tiles          # one wave: a partial second wave would double the time
    splits = max(1, min(splits, k_tiles // 4 if k_tiles >= 8 else 1, 32))
    return mw, splits


# Shared memory per block a kernel may opt into on A100 (sm_80), the smallest of the targets the build ships SASS
# for; assumed where no GPU is visible.
A100_SMEM_OPTIN = 163 * 1024


def _smem_optin(device: torch.device | None) -> int:
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return A100_SMEM_OPTIN
    return _sm_count_and_smem(device if device is not None else torch.device("cuda"))[1]


def lora_small_supported(rows_per_stream: int, n_streams: int, rank: int, dtype: torch.dtype, in_features: int,
                         n_used: int = 1, *, device: torch.device | None = None,
                         smem_optin: int | None = None) -> bool:
    """Whether lora_linear_forward takes this shape (cheap; does not load the extension): exactly where
    lora_small_config finds a configuration within the shared memory per block that `device` (default: the
    current CUDA device; A100's 163 KiB without one) lets a kernel opt into: 99 KiB on sm_86/sm_89, 163 KiB on
    A100, 227 KiB on H100. `smem_optin` overrides the device's figure."""
    rows = rows_per_stream * n_streams
    if smem_optin is None:
        smem_optin = _smem_optin(device)
    return (dtype in LORA_DTYPES and 1 <= n_streams <= LORA_MAX_STREAMS and 0 < rows <= LORA_MAX_ROWS
            and in_features % 8 == 0 and in_features > 0 and (n_used == 0 or 1 <= rank <= LORA_MAX_RANK)
            and lora_small_config(rows, 1, in_features, rank if n_used else 0, n_used,
                                  smem_optin=smem_optin) is not None)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % 16 == 0 else t.clone()


def lora_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor,
                        lora_B: torch.Tensor, scaling: list[float], stream_adapters: list[int], *,
                        block_m_warps: int | None = None, splits: int | None = None):
    """-> (y [rows, N] in x's dtype, xa [rows, r] fp32: x·A[a]ᵀ on adapter-stream rows, base rows unspecified).

    bf16/fp16, at most 128 rows (all streams), 8 streams, rank 128, in_features % 8 == 0.
    """
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        _check_cuda(name, t)
    if x.dtype not in LORA_DTYPES:
        raise ValueError(f"x: dtype {x.dtype} not supported by the CUDA small-batch kernel (bfloat16 or float16; "
                         "use backend='triton' or 'torch')")
    if x.dim() != 2:
        raise ValueError(f"x: expected [rows, K], got shape {tuple(x.shape)}")
    rows, K = x.shape
    N = weight.shape[0]
    S = len(stream_adapters)
    if not 1 <= S <= LORA_MAX_STREAMS:
        raise ValueError(f"stream_adapters: 1 to {LORA_MAX_STREAMS} streams supported, got {S}")
    if rows > LORA_MAX_ROWS:
        raise ValueError(f"x: the CUDA small-batch kernel takes at most {LORA_MAX_ROWS} rows (all streams), "
                         f"got {rows}")
    if K % 8 or K == 0:
        raise ValueError(f"x: in_features must be a positive multiple of 8 for the CUDA kernel, got {K}")
    used = sorted({a for a in stream_adapters if a >= 0})
    r = lora_A.shape[1]
    if used and not 1 <= r <= LORA_MAX_RANK:
        raise ValueError(f"lora_A: rank must be in [1, {LORA_MAX_RANK}] for the CUDA kernel, got {r}")
    sm_count, optin = _sm_count_and_smem(x.device)
    cfg = lora_small_config(rows, N, K, r if used else 0, len(used), sm_count, optin)
    if cfg is None:
        raise ValueError(f"x: shape (rows={rows}, rank={r}, adapters={len(used)}) does not fit the CUDA kernel's "
                         "shared memory; use backend='triton'")
    mw = cfg[0] if block_m_warps is None else int(block_m_warps)
    sp = cfg[1] if splits is None else int(splits)
    x, weight = _aligned(x.contiguous()), _aligned(weight.contiguous())
    lora_A, lora_B = _aligned(lora_A.contiguous()), _aligned(lora_B.contiguous())
    if bias is not None:
        bias = bias.contiguous()
    return _ops().lora_small_fwd(x, weight, bias, lora_A, lora_B, [float(s) for s in scaling],
                                 [int(a) for a in stream_adapters], mw, sp)
