"""ops.lora_linear: one linear layer, several LoRA streams, one launch.

Rows of x ([rows, K], leading dims flattened) are split into S equal contiguous streams (kernels/layout.py);
stream s uses adapter stream_adapters[s] (−1 = base, LoRA off). y = x·Wᵀ + b (+ scaling[a]·(x·A[a]ᵀ)·B[a]ᵀ).
The base weight and bias are frozen: gradients flow to x, lora_A and lora_B only.

lora_A / lora_B are in x's dtype, or fp32 master weights with a 16-bit x (as PEFT keeps adapters of a bf16
model: an AdamW step of lr 1e-5 is below half a bf16 ulp of most adapter entries and would be lost). fp32 adapters
enter every kernel rounded to x's dtype, so the forward equals that of 16-bit adapters bit for bit; their
gradients come back in fp32, from the fp32 accumulators, never rounded to 16 bits.

Registered with torch.library (hydra_kernels::lora_linear and its backward) so torch.compile traces it.
The forward also returns the fp32 shrink x·Aᵀ (rows of base streams are unspecified); the backward reuses
it for dB, so only x, the shrink and the (shared) parameters are saved.
"""
from __future__ import annotations

import numbers
import operator
import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from hydra_kernels.kernels.layout import rows_per_stream, split_streams
from hydra_kernels.ops._checks import FLOAT_DTYPES, check_real, check_same_dtype, check_tensor, plain_eager
from hydra_kernels.ops.backend import choose_backend

__all__ = ["lora_linear"]


# ----------------------------------------------------------------------------------------- torch backend
# The torch loop upcasts rows to fp32 a chunk at a time: whole-stream fp32 copies of x and dy ([rows, 11008] at
# Llama-7B) would be the largest temporaries of an update with activation checkpointing; the Triton kernels
# upcast tiles in registers. 2**23 elements = 32 MiB per fp32 temporary.
CHUNK_ELEMENTS = 1 << 23


def _row_chunks(rows: slice, width: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // max(width, 1))
    return [slice(i, min(i + step, rows.stop)) for i in range(rows.start, rows.stop, step)]


def _torch_forward(x, weight, bias, lora_A, lora_B, scaling, stream_adapters):
    y = F.linear(x, weight, bias)
    xa = torch.empty(x.shape[0], lora_A.shape[1], device=x.device, dtype=torch.float32)   # base rows: unspecified
    width = max(x.shape[1], y.shape[1])
    for s, rows in enumerate(split_streams(x.shape[0], len(stream_adapters))):
        a = stream_adapters[s]
        if a < 0:
            continue
        A, B = lora_A[a].float(), lora_B[a].float()
        for c in _row_chunks(rows, width):
            xa_c = torch.mm(x[c].float(), A.t(), out=xa[c])
            if y.dtype == torch.float32:
                y[c].addmm_(xa_c, B.t(), alpha=scaling[a])      # decoding on CPU: one op, no temporary
            elif y.dtype == torch.float64:
                y[c].add_(torch.mm(xa_c, B.t()), alpha=scaling[a])
            else:
                # Added in fp32 and rounded once; with lora_B == 0 this returns the base rows bit for bit.
                delta = torch.mm(xa_c, B.t()).mul_(scaling[a])
                y[c] = delta.add_(y[c])
                del delta                       # before the next chunk's
    return y, xa


def _torch_backward(dy, x, weight, lora_A, lora_B, xa, scaling, stream_adapters, need_dx):
    dx = dy @ weight if need_dx else None
    dA = torch.zeros(lora_A.shape, device=x.device, dtype=torch.float32)
    dB = torch.zeros(lora_B.shape, device=x.device, dtype=torch.float32)
    for s, rows in enumerate(split_streams(x.shape[0], len(stream_adapters))):
        a = stream_adapters[s]
        if a < 0:
            continue
        A, B = lora_A[a].to(x.dtype).float(), lora_B[a].to(x.dtype).float()     # the adapters the forward used
        for c in _row_chunks(rows, max(x.shape[1], dy.shape[1])):
            g = dy[c].float()
            gB = g @ B                                                  # [m, r]
            dB[a] += scaling[a] * (g.T @ xa[c])
            del g
            dA[a] += scaling[a] * (gB.T @ x[c].float())
            if need_dx:
                # dx + s·(gB·A) in fp32, rounded once; in place: one fp32 [m, K] temporary, not three.
                dx[c] = (gB @ A).mul_(scaling[a]).add_(dx[c])
            del gB                              # before the next chunk's
    return dx, dA.to(lora_A.dtype), dB.to(lora_B.dtype)


# CUDA small-batch kernel (csrc/lora_linear_small.cu) vs Triton. EXPECTED crossover from the roofline, NOT
# MEASURED YET: replace with the numbers from `python bench/bench_lora_linear.py` (triton vs cuda) on an H200.
# Up to the mma.sync ridge (~660 dense bf16 TFLOP/s / ~4.3 TB/s ≈ 150 rows in all) both kernels are bound by
# reading W once, ≈ 2·N·K bytes / 4.3 TB/s; the CUDA kernel splits K so that every SM streams W even when
# N / BLOCK_N tiles alone cannot fill the GPU, which is the small-row regime. Conservative until measured:
# at most 64 rows per stream and 128 rows in all, forward only (no gradient needed).
_CUDA_MAX_ROWS_PER_STREAM = 64
_CUDA_MAX_ROWS = 128
# `auto` uses the rule above only with HYDRA_KERNELS_CUDA_AUTO=1. The kernel compiles (sm_80/sm_90, no spills)
# and its tile addressing is checked on the host, but it has never run on a GPU: until bench/run_gpu.sh's
# `tests` and `bench` stages have passed and measured it on one, `auto` keeps to the Triton kernel (which has)
# rather than JIT-compile and trust unexecuted code in the middle of a user's decoding loop. `backend="cuda"`
# (or HYDRA_KERNELS_BACKEND=cuda) asks for the CUDA kernel explicitly.
CUDA_AUTO_ENV = "HYDRA_KERNELS_CUDA_AUTO"


def _gpu_default(rows_per_stream: int, rank: int, *, n_streams: int = 1, dtype: torch.dtype | None = None,
                 in_features: int = 0, n_adapters_used: int = 0, needs_grad: bool = False,
                 device: torch.device | None = None) -> str:
    """Which GPU kernel `auto` picks for a shape (see the crossover note above)."""
    if (needs_grad or device is None or device.type != "cuda" or rows_per_stream > _CUDA_MAX_ROWS_PER_STREAM
            or rows_per_stream * n_streams > _CUDA_MAX_ROWS or os.environ.get(CUDA_AUTO_ENV) != "1"):
        return "triton"
    from hydra_kernels.kernels import cuda as cuda_kernels
    if not cuda_kernels.lora_small_supported(rows_per_stream, n_streams, rank, dtype, in_features,
                                             n_adapters_used, device=device):
        return "triton"
    return "cuda" if cuda_kernels.is_available() else "triton"


def _forward_impl(backend):
    if backend == "torch":
        return _torch_forward
    if backend == "triton":
        from hydra_kernels.kernels.triton.lora_linear import lora_linear_forward
        return lora_linear_forward
    if backend == "cuda":
        from hydra_kernels.kernels.cuda import lora_linear_forward
        return lora_linear_forward
    raise ValueError(f"backend: unknown backend {backend!r}")


def _backward_impl(backend):
    if backend == "torch":
        return _torch_backward
    # The CUDA kernel is forward-only (small-batch scoring/decoding); its backward is the Triton one.
    from hydra_kernels.kernels.triton.lora_linear import lora_linear_backward
    return lora_linear_backward


# ------------------------------------------------------------------------------- torch.library op
def _run_forward(x, weight, bias, lora_A, lora_B, scaling, stream_adapters, backend):
    # fp32 master adapters enter the kernels rounded to x's dtype.
    if lora_A.dtype != x.dtype:
        lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    return _forward_impl(backend)(x, weight, bias, lora_A, lora_B, list(scaling), list(stream_adapters))


@torch.library.custom_op("hydra_kernels::lora_linear", mutates_args=())
def _lora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: Sequence[float],
                    stream_adapters: Sequence[int], backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _run_forward(x, weight, bias, lora_A, lora_B, scaling, stream_adapters, backend)


@_lora_linear_op.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, stream_adapters, backend):
    return (x.new_empty(x.shape[0], weight.shape[0]),
            x.new_empty(x.shape[0], lora_A.shape[1], dtype=torch.float32))


@torch.library.custom_op("hydra_kernels::lora_linear_backward", mutates_args=())
def _lora_linear_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor,
                             scaling: Sequence[float], stream_adapters: Sequence[int], need_dx: bool,
                             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dx, dA, dB = _backward_impl(backend)(dy.contiguous(), x, weight, lora_A, lora_B, xa, list(scaling),
                                         list(stream_adapters), need_dx)
    return (dx if dx is not None else x.new_empty(0)), dA, dB


@_lora_linear_backward_op.register_fake
def _(dy, x, weight, lora_A, lora_B, xa, scaling, stream_adapters, need_dx, backend):
    dx = x.new_empty(x.shape) if need_dx else x.new_empty(0)
    return dx, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)


# Non-reentrant activation checkpointing replaces saved tensors with those of the recomputed forward, while ctx's
# other attributes stay the original forward's: a saved copy of the layout tells a recomputation that ran another
# one (a different stream count already fails checkpoint's own shape check). Unseen by reentrant checkpointing.
LAYOUT_MISMATCH = ("lora_linear: activation-checkpoint recomputation ran stream adapters {got}, its forward ran "
                   "{want}: the recomputation must run the forward's stream layout. Use HydraModel.enable_activation_"
                   "checkpointing, or pass context_fn=hydra_kernels.nn.checkpoint_context_fn to torch.utils.checkpoint "
                   "(use_reentrant=False; transformers: activation_checkpointing_kwargs)")


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, stream_adapters, backend = inputs
    _, xa = output
    # On the host in eager mode (backward reads it without a device sync), on x's device in traced graphs.
    traced = torch.compiler.is_compiling() or type(x) is not torch.Tensor
    layout = torch.tensor(stream_adapters, dtype=torch.int64, device=x.device if traced else "cpu")
    ctx.save_for_backward(x, weight, lora_A, lora_B, xa, layout)
    ctx.scaling, ctx.stream_adapters, ctx.backend = scaling, stream_adapters, backend


def _backward(ctx, dy, _dxa):
    x, weight, lora_A, lora_B, xa, layout = ctx.saved_tensors
    if plain_eager(dy) and layout.tolist() != list(ctx.stream_adapters):
        raise RuntimeError(LAYOUT_MISMATCH.format(got=layout.tolist(), want=list(ctx.stream_adapters)))
    need_x, _, _, need_A, need_B = ctx.needs_input_grad[:5]
    if not (need_x or need_A or need_B):
        return None, None, None, None, None, None, None, None
    dx, dA, dB = _lora_linear_backward_op(dy, x, weight, lora_A, lora_B, xa, ctx.scaling,
                                          ctx.stream_adapters, need_x, ctx.backend)
    return (dx if need_x else None), None, None, (dA if need_A else None), (dB if need_B else None), \
        None, None, None


_lora_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------- public op
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                lora_A: torch.Tensor | None = None, lora_B: torch.Tensor | None = None,
                scaling: float | Sequence[float] = 1.0, stream_adapters: Sequence[int] = (-1,), *,
                backend: str | None = None) -> torch.Tensor:
    """Multi-stream LoRA linear. See the module docstring for the contract.

    x: [..., K]; weight: [N, K] (frozen, N, K >= 1); bias: [N] or None; lora_A: [n, r, K] (r >= 1);
    lora_B: [n, N, r]; scaling: a finite number for all adapters or one per adapter (a str or bool is refused);
    stream_adapters: int adapter index per stream (−1 = base; a bool is refused).
    backend: "torch", "triton", "cuda" or None (HYDRA_KERNELS_BACKEND, else automatic).
    Returns y [..., N] in x's dtype. Raises ValueError naming the argument for any of the above.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError(f"x: expected at least 1 dimension, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    N, K = weight.shape
    if K == 0 or N == 0:
        raise ValueError(f"weight: shape {tuple(weight.shape)}; in_features and out_features must be >= 1")
    if x.shape[-1] != K:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match weight's in_features {K}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        if bias.shape[0] != N:
            raise ValueError(f"bias: length {bias.shape[0]} does not match weight's out_features {N}")
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A: lora_A and lora_B must be given together")
    if lora_A is None:
        lora_A = x.new_zeros(0, 1, K)
        lora_B = x.new_zeros(0, N, 1)
    adapter_dtypes = (x.dtype, torch.float32) if x.dtype in (torch.bfloat16, torch.float16) else (x.dtype,)
    check_tensor("lora_A", lora_A, ndim=3, dtypes=adapter_dtypes, device=x.device)
    check_tensor("lora_B", lora_B, ndim=3, dtypes=adapter_dtypes, device=x.device)
    check_same_dtype("lora_A", lora_A, lora_B=lora_B)
    n, r = lora_A.shape[0], lora_A.shape[1]
    if r == 0:
        raise ValueError(f"lora_A: shape {tuple(lora_A.shape)} has rank 0 (expected [n, r >= 1, {K}])")
    if lora_A.shape[2] != K:
        raise ValueError(f"lora_A: shape {tuple(lora_A.shape)} does not match in_features {K} (expected [n, r, {K}])")
    if tuple(lora_B.shape) != (n, N, r):
        raise ValueError(f"lora_B: shape {tuple(lora_B.shape)}, expected {(n, N, r)} to match lora_A and weight")
    if isinstance(scaling, torch.Tensor):
        scaling = scaling.tolist()
    try:
        if isinstance(scaling, (str, bytes, bool)):
            raise TypeError
        # numbers.Real covers numpy scalars (np.float32 is no float subclass); a str or bool is no scaling.
        scales = ([check_real("scaling", scaling)] * n if isinstance(scaling, numbers.Real)
                  else [check_real("scaling", s) for s in scaling])
    except TypeError:
        raise ValueError(f"scaling: expected a number or one number per adapter, got {scaling!r}") from None
    if len(scales) != n:
        raise ValueError(f"scaling: expected one value per adapter ({n}), got {len(scales)}")
    try:
        # ints only: 0.7 is no adapter index, and True is no adapter index 1.
        if isinstance(stream_adapters, (str, bytes)) or any(isinstance(a, bool) for a in stream_adapters):
            raise TypeError
        adapters = [operator.index(a) for a in stream_adapters]
    except TypeError:
        raise ValueError(f"stream_adapters: expected a sequence of int adapter indices, got {stream_adapters!r}") \
            from None
    if not adapters:
        raise ValueError("stream_adapters: needs at least one stream")
    for a in adapters:
        if not -1 <= a < n:
            raise ValueError(f"stream_adapters: adapter index {a} out of range for {n} adapters (−1 = base)")
    x2 = x.reshape(-1, K)
    m = rows_per_stream(x2.shape[0], len(adapters))
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("weight: lora_linear treats the base weight as frozen; call weight.requires_grad_(False)")
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise ValueError("bias: lora_linear treats the base bias as frozen; call bias.requires_grad_(False)")
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or lora_A.requires_grad or lora_B.requires_grad)
    gpu_default = _gpu_default(m, r, n_streams=len(adapters), dtype=x.dtype,
                               in_features=K, n_adapters_used=len({a for a in adapters if a >= 0}),
                               needs_grad=needs_grad, device=x.device)
    chosen = choose_backend(backend, x.device, gpu_default=gpu_default)
    args = (x2.contiguous(), weight.contiguous(), bias, lora_A.contiguous(), lora_B.contiguous(), scales, adapters)
    if needs_grad or not plain_eager(x2):      # x2: a reshape made here, a FakeTensor under FakeTensorMode
        y, _ = _lora_linear_op(*args, chosen)
    else:
        # Eager and no gradient (decoding, scoring): the same implementation without the custom op's dispatch,
        # which costs ~30 us a call, several times a small decoding step's kernel time over a model's layers.
        y, _ = _run_forward(*args, chosen)
    return y.reshape(*x.shape[:-1], N)
