"""Triton kernels for ops.lora_linear: the fused multi-stream LoRA linear, forward and backward.

Forward: ONE launch for all streams. Each program owns one BLOCK_M row tile of one stream and N_GROUP
consecutive BLOCK_N column tiles. Its K-loop loads the x tile once and feeds it to two tensor-core dots:
the base GEMM (x·Wᵀ) and the LoRA shrink (x·A[a]ᵀ, A tile [BLOCK_K, R_PAD]). The expand (·B[a]ᵀ) runs in
the epilogue with fp32 accumulation, then y is rounded once. Base streams take a K-loop without any LoRA
work (no A or B loads, no shrink); their epilogue runs one small all-zero MMA, see "Exactness" below.

  * Streams never straddle a tile: the grid runs over (stream, m-tile within the stream), so a stream whose
    row count is not a multiple of BLOCK_M just has a masked last tile. Every row of every stream therefore
    sits at the same position of a tile with the same K-loop, which is what makes the exactness property hold
    without assuming anything about how a tensor core orders its sums across tile positions.
  * Exactness (lora_B == 0 ⇒ adapter rows == base rows, bit for bit): the base accumulator is built by the
    same sequence of dots in both K-loops. The expand then runs as one MMA into that accumulator for *every*
    tile: adapter tiles add s·xa·B[a]ᵀ, base tiles add 0·0 (xa = 0, scale 0, B tile masked off, no loads).
    With B = 0 both add only zero products through the same instruction, so the result is identical even if
    a tensor core were to touch its accumulator when adding zeros (the interpreter adds exact zeros: acc + 0).
    Bias is added after, in the same order for both kinds of stream.
  * N_GROUP > 1 amortises the shrink: it is computed during the first of the program's N_GROUP column tiles
    and reused for the others. Every program recomputes the shrink for its rows (it needs the full x·Aᵀ for
    its epilogue), so the extra tensor-core work is R_PAD / (BLOCK_N · N_GROUP) of the base GEMM; the
    autotuner trades that against wave quantisation.
  * Grid: 1-D, S · m-tiles · n-groups programs, grouped GROUP_M m-tiles at a time so tiles that share W
    columns (including the same rows of different streams at small row counts) run together and hit L2.
    Only axis 0 is used, so any number of rows works.

Backward:
  * dx = dY·W + s·(dY·B)·A is the forward problem again with W, A, B seen through transposed strides
    (W as [K, N], B as the "shrink" [r, N], A as the "expand" [K, r]): the same kernel, fused the same way,
    and it also writes gB = dY·B[a] (fp32) that dA needs. Without need_dx it runs in shrink-only mode.
  * dB[a] = s·dYᵀ·xa and dA[a]ᵀ = s·xᵀ·gB are skinny GEMMs reduced over rows ([N or K] × r outputs). One
    Triton kernel does both shapes: programs over (adapter stream, row chunk, output tile), fp32 dots (tf32
    on 16-bit inputs), each program writing an fp32 partial; the partials are summed by torch in a fixed
    order (deterministic, unlike fp32 atomics) and cast once. Row chunks exist because N/BLOCK or K/BLOCK
    tiles alone give too few programs to fill the GPU. Why not torch matmuls here: the operands have mixed
    dtypes (16-bit dY or x, fp32 xa or gB), so torch would need either xa/gB rounded to 16 bits or an fp32
    GEMM over all of dY/x (CUDA-core speed), plus one launch per stream; the kernel reads the 16-bit tensor
    once and accumulates in fp32.

Precision (16-bit inputs): every accumulation is fp32. The fp32 intermediates that feed a second MMA (s·xa
in the forward epilogue, s·gB in dx, xa and gB in dB/dA) are rounded to tf32 (10-bit mantissa) by the
tensor core, which is finer than the bf16 rounding peft applies to them; 16-bit values are exact in tf32.
fp32 inputs use exact fp32 ("ieee") dots throughout.

Scalars that change the math (per-stream scaling, per-stream adapter index) are small device tensors
(cached per layout), never Python floats baked into a compiled graph.
"""
from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from hydra_kernels.kernels.layout import rows_per_stream
from hydra_kernels.kernels.triton import device_guard, on_interpreter, skip_listed, triton_interpreting

__all__ = ["lora_linear_forward", "lora_linear_backward", "MAX_RANK"]

MAX_RANK = 256
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16)


# ============================================================================================= kernels
@triton.jit
def _kloop_base(acc, x_ptr, w_ptr, rows, row_mask, offs_n, n_mask, K,
                stride_xm, stride_xk, stride_wn, stride_wk,
                BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:      # the interpreter's dot mishandles bf16; products of 16-bit values are exact in fp32
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PREC)
    return acc


@triton.jit
def _kloop_lora(acc, xa, x_ptr, w_ptr, a_base, rows, row_mask, offs_n, n_mask, offs_r, r_mask, K,
                stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    # Same x/W loads and the same dot sequence on `acc` as _kloop_base (exactness), plus the shrink.
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wt = tl.load(w_ptr + kk[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                     mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        at = tl.load(a_base + kk[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(xt, wt, acc, input_precision=DOT_PREC)
        xa = tl.dot(xt, at, xa, input_precision=DOT_PREC)
    return acc, xa


@triton.jit
def _kloop_shrink(xa, x_ptr, a_base, rows, row_mask, offs_r, r_mask, K,
                  stride_xm, stride_xk, stride_ar, stride_ak,
                  BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_mask = kk < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_base + kk[:, None] * stride_ak + offs_r[None, :] * stride_ar,
                     mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        xa = tl.dot(xt, at, xa, input_precision=DOT_PREC)
    return xa


@triton.jit
def _lora_gemm_kernel(
        x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, xa_ptr, adapters_ptr, scale_ptr,
        rows_per_stream, N, K, R, n_streams,
        stride_xm, stride_xk, stride_wn, stride_wk,
        stride_aa, stride_ar, stride_ak,
        stride_ba, stride_bn, stride_br,
        stride_ym, stride_yn, stride_xam,
        ROWS_BUCKET,                                    # autotune key only (row-count class)
        HAS_BIAS: tl.constexpr, COMPUTE_Y: tl.constexpr, UPCAST: tl.constexpr,
        DOT_PREC: tl.constexpr, EPI_PREC: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr, N_GROUP: tl.constexpr):
    """y[rows, N] = x·Wᵀ (+ s·(x·A[a]ᵀ)·B[a]ᵀ) (+ bias); xa = x·A[a]ᵀ (fp32) for adapter streams.

    x [rows, K]; W seen as [N, K]; A seen as [n, R, K]; B seen as [n, N, R] (any strides).
    COMPUTE_Y=False: shrink only (xa), no W traffic; the grid then has one program per m-tile.
    """
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(rows_per_stream, BLOCK_M)
    num_pid_m = n_streams * tiles_m
    if COMPUTE_Y:
        n_groups = tl.cdiv(tl.cdiv(N, BLOCK_N), N_GROUP)
    else:
        n_groups = 1
    # Grouped order: GROUP_M consecutive m-tiles (possibly of different streams) sweep the same W columns.
    width = GROUP_M * n_groups
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_g = (pid % width) // group_size

    stream = pid_m // tiles_m
    m_tile = pid_m - stream * tiles_m
    adapter = tl.load(adapters_ptr + stream)
    offs_local = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = offs_local < rows_per_stream
    rows = stream.to(tl.int64) * rows_per_stream + offs_local
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    r_live = tl.where(adapter >= 0, R, 0)               # B columns a tile may read: none for base streams
    # Base streams (adapter −1) form these pointers but never dereference them.
    a_base = a_ptr + adapter.to(tl.int64) * stride_aa
    b_base = b_ptr + adapter.to(tl.int64) * stride_ba
    xa = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)

    if COMPUTE_Y:
        for j in tl.static_range(N_GROUP):
            pid_n = pid_g * N_GROUP + j
            if pid_n * BLOCK_N < N:
                offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
                n_mask = offs_n < N
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                if j == 0:
                    if adapter >= 0:
                        acc, xa = _kloop_lora(acc, xa, x_ptr, w_ptr, a_base, rows, row_mask, offs_n, n_mask,
                                              offs_r, r_mask, K, stride_xm, stride_xk, stride_wn, stride_wk,
                                              stride_ar, stride_ak, BLOCK_K, UPCAST, DOT_PREC)
                        if pid_g == 0:
                            tl.store(xa_ptr + rows[:, None] * stride_xam + offs_r[None, :], xa,
                                     mask=row_mask[:, None] & r_mask[None, :])
                    else:
                        acc = _kloop_base(acc, x_ptr, w_ptr, rows, row_mask, offs_n, n_mask, K,
                                          stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_K, UPCAST, DOT_PREC)
                else:
                    acc = _kloop_base(acc, x_ptr, w_ptr, rows, row_mask, offs_n, n_mask, K,
                                      stride_xm, stride_xk, stride_wn, stride_wk, BLOCK_K, UPCAST, DOT_PREC)
                # Expand, on the identical path for both kinds of stream: base tiles have xa = 0, scale = 0 and
                # a fully masked (never read) B tile, so both add only zero products into acc through the same
                # MMA. Whatever a tensor core does to its accumulator when every product is zero, it does the
                # same to base and adapter tiles, so lora_B == 0 gives bit-identical rows. The cost for a base
                # tile is one [BLOCK_M, R_PAD]x[R_PAD, BLOCK_N] MMA (R_PAD/K of its work), no memory traffic.
                # Accumulating into acc (not a second [BLOCK_M, BLOCK_N] fp32 accumulator, which would double
                # the largest register consumer) keeps the footprint near a plain GEMM's plus the shrink.
                scale = tl.load(scale_ptr + stream)              # 0.0 for base streams
                bt = tl.load(b_base + offs_r[:, None] * stride_br + offs_n[None, :] * stride_bn,
                             mask=(offs_r < r_live)[:, None] & n_mask[None, :], other=0.0)
                acc = tl.dot(xa * scale, bt.to(tl.float32), acc, input_precision=EPI_PREC)
                if HAS_BIAS:
                    bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
                    acc = acc + bias[None, :]
                tl.store(y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn,
                         acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
    else:
        if adapter >= 0:
            xa = _kloop_shrink(xa, x_ptr, a_base, rows, row_mask, offs_r, r_mask, K,
                               stride_xm, stride_xk, stride_ar, stride_ak, BLOCK_K, UPCAST, DOT_PREC)
            tl.store(xa_ptr + rows[:, None] * stride_xam + offs_r[None, :], xa,
                     mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def _lora_wgrad_kernel(
        g_ptr, q_ptr, part_ptr, scale_ptr, lora_streams_ptr,
        rows_per_stream, BIG, R, n_chunks,
        stride_gm, stride_gb, stride_qm, stride_qr,
        stride_pl, stride_pc, stride_pb,
        ROWS_BUCKET,                                    # autotune key only
        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, R_PAD: tl.constexpr,
        BLOCK_BIG: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """part[l, c, big, r] = s · Σ_{rows of chunk c of adapter stream l} g[row, big] · q[row, r]   (fp32).

    dB: g = dY [rows, N], q = xa [rows, r].   dAᵀ: g = x [rows, K], q = gB [rows, r].
    """
    pid = tl.program_id(0)
    tiles_big = tl.cdiv(BIG, BLOCK_BIG)
    t = pid % tiles_big
    rest = pid // tiles_big
    c = rest % n_chunks
    l = rest // n_chunks
    stream = tl.load(lora_streams_ptr + l)
    scale = tl.load(scale_ptr + stream)
    per_chunk = tl.cdiv(tl.cdiv(rows_per_stream, BLOCK_ROWS), n_chunks) * BLOCK_ROWS
    lo = c * per_chunk
    hi = tl.minimum(lo + per_chunk, rows_per_stream)
    first_row = stream.to(tl.int64) * rows_per_stream

    offs_b = t * BLOCK_BIG + tl.arange(0, BLOCK_BIG)
    b_mask = offs_b < BIG
    offs_r = tl.arange(0, R_PAD)
    r_mask = offs_r < R
    offs_m = tl.arange(0, BLOCK_ROWS)
    acc = tl.zeros((BLOCK_BIG, R_PAD), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_ROWS):
        mm = m0 + offs_m
        m_mask = mm < hi
        rows = first_row + mm
        gt = tl.load(g_ptr + rows[None, :] * stride_gm + offs_b[:, None] * stride_gb,
                     mask=b_mask[:, None] & m_mask[None, :], other=0.0).to(tl.float32)
        qt = tl.load(q_ptr + rows[:, None] * stride_qm + offs_r[None, :] * stride_qr,
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(tl.float32)
        acc = tl.dot(gt, qt, acc, input_precision=DOT_PREC)
    tl.store(part_ptr + l.to(tl.int64) * stride_pl + c * stride_pc + offs_b[:, None] * stride_pb + offs_r[None, :],
             acc * scale, mask=b_mask[:, None] & r_mask[None, :])


# ==================================================================================== launch configs
def _cfg(bm, bn, bk, ng, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "N_GROUP": ng},
                         num_warps=warps, num_stages=stages)


# Row-count classes (rows per stream): small rows are bound by reading W once, so many narrow column tiles
# and deep K tiles keep enough loads in flight; large rows are tensor-core bound, so wide tiles and N_GROUP > 1
# (fewer redundant shrinks). The prune below keeps a class's list and drops what does not fit.
_GEMM_CLASSES = {
    "small": [_cfg(16, 32, 256, 1, 4, 4), _cfg(16, 64, 128, 1, 4, 5), _cfg(16, 64, 256, 1, 4, 3),
              _cfg(16, 128, 128, 1, 4, 4), _cfg(32, 64, 128, 1, 4, 4), _cfg(32, 128, 128, 1, 4, 4),
              _cfg(32, 32, 256, 1, 4, 4),
              # shallower K steps: the only ones whose A tile still fits shared memory at rank 128-256
              _cfg(16, 64, 64, 1, 4, 4), _cfg(32, 64, 64, 1, 4, 4), _cfg(16, 128, 64, 1, 4, 4)],
    "mid": [_cfg(64, 64, 128, 1, 4, 4), _cfg(64, 128, 64, 1, 4, 4), _cfg(64, 128, 128, 1, 4, 3),
            _cfg(64, 256, 64, 1, 8, 3), _cfg(128, 128, 64, 1, 8, 4), _cfg(128, 128, 64, 2, 8, 4),
            _cfg(32, 128, 128, 1, 4, 4), _cfg(64, 64, 64, 1, 4, 4),
            _cfg(64, 128, 64, 1, 8, 3), _cfg(64, 64, 64, 1, 8, 3)],        # 8 warps: rank 256 fits
    "large": [_cfg(128, 128, 64, 1, 8, 4), _cfg(128, 128, 64, 2, 8, 4), _cfg(128, 256, 64, 1, 8, 3),
              _cfg(128, 256, 64, 2, 8, 3), _cfg(128, 64, 64, 4, 8, 4), _cfg(64, 128, 64, 2, 4, 4),
              _cfg(64, 256, 64, 1, 8, 3), _cfg(64, 128, 64, 1, 4, 4),
              _cfg(64, 128, 64, 1, 8, 3), _cfg(64, 64, 64, 1, 8, 3)],
    # fp32 inputs use exact ("ieee") dots, which run on CUDA cores with both operands in registers: small
    # tiles, shallow K (correctness path; the performance targets are bf16).
    "fp32": [_cfg(16, 64, 32, 1, 4, 2), _cfg(32, 32, 32, 1, 4, 2), _cfg(16, 32, 32, 1, 4, 2),
             _cfg(16, 32, 32, 1, 8, 2), _cfg(32, 64, 32, 1, 8, 2)],
}


def _cfg_key(c):
    k = c.kwargs
    return (k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"], k["N_GROUP"], c.num_warps, c.num_stages)


# Classes by config value (not object identity, in case the autotuner copies its configs).
_GEMM_CLASS_OF: dict = {}
for _name, _cs in _GEMM_CLASSES.items():
    for _c in _cs:
        _GEMM_CLASS_OF.setdefault(_cfg_key(_c), set()).add(_name)
_GEMM_CONFIGS = list({_cfg_key(c): c for cs in _GEMM_CLASSES.values() for c in cs}.values())
_SMEM_BUDGET = 200 * 1024       # H100/H200 allow 227 KB per block; leave room for layout conversions
# fp32 accumulator registers per thread (acc + shrink, +16 when N_GROUP > 1 keeps more live). Calibrated on
# sm_90 builds of this kernel (ptxas, Triton 3.9): ≤ 136 compiled without spills, the configs above it
# spilled (e.g. 128x256 at rank 64: 160 -> 56 B of stack; 128x128 N_GROUP=2 at rank 128: 144 -> 24 B).
_ACC_REGS_BUDGET = 136


_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}   # as the build records


def _arg(named_args, kwargs, name):
    return kwargs[name] if name in kwargs else named_args[name]


def _rows_class(bucket: int) -> str:
    return "small" if bucket <= 32 else ("mid" if bucket <= 256 else "large")


def _prune_gemm(configs, named_args, **kwargs):
    r_pad = _arg(named_args, kwargs, "R_PAD")
    dtype = named_args["x_ptr"].dtype
    cls = "fp32" if dtype == torch.float32 else _rows_class(_arg(named_args, kwargs, "ROWS_BUCKET"))
    compute_y = _arg(named_args, kwargs, "COMPUTE_Y")
    elt = 4 if dtype == torch.float32 else 2
    kept = []
    for c in configs:
        if cls not in _GEMM_CLASS_OF.get(_cfg_key(c), ()):
            continue
        k = c.kwargs
        if not compute_y and k["N_GROUP"] != 1:
            continue
        bm, bn, bk = k["BLOCK_M"], k["BLOCK_N"], k["BLOCK_K"]
        smem = c.num_stages * (bm * bk + bk * bn + bk * r_pad) * elt
        if cls == "fp32":         # accumulators + register-resident operands of the FMA dots (also calibrated)
            regs = (bm * bn + bm * r_pad + r_pad * bn + bm * bk + bk * bn) / (32 * c.num_warps)
            ok = regs <= 80
        else:
            regs = (bm * bn + bm * r_pad) / (32 * c.num_warps) + (16 if k["N_GROUP"] > 1 else 0)
            ok = regs <= _ACC_REGS_BUDGET
        if smem <= _SMEM_BUDGET and ok:
            kept.append(c)
    if not kept:                  # large rank: fall back to the smallest footprint
        kept = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8, "N_GROUP": 1},
                              num_warps=8, num_stages=2)]
    return skip_listed("lora_gemm", kept, dtype=_DTYPE_NAMES.get(dtype), r_pad=r_pad)


def _wcfg(bb, br, warps, stages):
    return triton.Config({"BLOCK_BIG": bb, "BLOCK_ROWS": br}, num_warps=warps, num_stages=stages)


_WGRAD_CONFIGS = [_wcfg(64, 32, 4, 3), _wcfg(64, 64, 4, 3), _wcfg(128, 32, 4, 3), _wcfg(128, 64, 8, 3),
                  _wcfg(32, 64, 4, 3), _wcfg(32, 32, 4, 2)]


def _prune_wgrad(configs, named_args, **kwargs):
    r_pad = _arg(named_args, kwargs, "R_PAD")
    kept = []
    for c in configs:
        bb, br = c.kwargs["BLOCK_BIG"], c.kwargs["BLOCK_ROWS"]
        smem = c.num_stages * (bb * br + br * r_pad) * 4
        regs = bb * r_pad / (32 * c.num_warps)
        if smem <= _SMEM_BUDGET and regs <= 128:
            kept.append(c)
    return skip_listed("lora_wgrad", kept or [_wcfg(32, 32, 4, 2)], r_pad=r_pad)


_gemm_tuned = triton.autotune(configs=_GEMM_CONFIGS,
                              key=["N", "K", "R_PAD", "ROWS_BUCKET", "n_streams", "COMPUTE_Y", "HAS_BIAS"],
                              prune_configs_by={"early_config_prune": _prune_gemm})(_lora_gemm_kernel)
_wgrad_tuned = triton.autotune(configs=_WGRAD_CONFIGS, key=["BIG", "R_PAD", "ROWS_BUCKET"],
                               prune_configs_by={"early_config_prune": _prune_wgrad})(_lora_wgrad_kernel)

# Under the interpreter (CPU tests) one small fixed config: N_GROUP=2 and GROUP_M=2 so the tests exercise
# shrink reuse and grouped ordering on small shapes.
_INTERP_GEMM = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "N_GROUP": 2}
_INTERP_WGRAD = {"BLOCK_BIG": 32, "BLOCK_ROWS": 16}


# ========================================================================================= host side
AUTOTUNE_ENV = "HYDRA_KERNELS_TRITON_AUTOTUNE"


def _fixed_config(t: torch.Tensor) -> bool:
    """The interpreter's single small config instead of autotuning: always under the interpreter, and on a
    GPU when HYDRA_KERNELS_TRITON_AUTOTUNE=0 (tests of odd small shapes; debugging a config-independent bug)."""
    return on_interpreter(t) or os.environ.get(AUTOTUNE_ENV, "1") == "0"


def _rows_bucket(rows_per_stream: int) -> int:
    return min(max(16, triton.next_power_of_2(max(rows_per_stream, 1))), 4096)


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


@functools.lru_cache(maxsize=64)
def _stream_meta(stream_adapters: tuple, scaling: tuple, device: torch.device):
    """Per-layout device tensors: adapter index per stream (int32), scale per stream (fp32, 0 for base),
    and the list of adapter streams. Cached so a training step does not re-upload them per layer."""
    adapters = torch.tensor(stream_adapters, dtype=torch.int32, device=device)
    scales = torch.tensor([scaling[a] if a >= 0 else 0.0 for a in stream_adapters], dtype=torch.float32,
                          device=device)
    lora = [s for s, a in enumerate(stream_adapters) if a >= 0]
    lora_streams = torch.tensor(lora or [0], dtype=torch.int32, device=device)
    return adapters, scales, lora_streams, tuple(lora)


def _check_dtype_device(x: torch.Tensor) -> None:
    if x.dtype not in _SUPPORTED:
        raise ValueError(f"x: dtype {x.dtype} not supported by the triton backend (expected one of "
                         f"{list(_SUPPORTED)}; float64 runs on the torch backend)")
    if x.device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"x: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got {x.device}")


def _precisions(dtype: torch.dtype, interpreting: bool):
    # fp32 inputs get exact fp32 dots (tf32 would miss fp32 accuracy by ~1e-3). For 16-bit inputs the base
    # dot is native; the fp32 epilogue/wgrad dots use tf32, which holds bf16/fp16 values exactly.
    upcast = interpreting and dtype == torch.bfloat16
    if dtype == torch.float32:
        return upcast, "ieee", "ieee"
    return upcast, "tf32", "tf32"


def _launch_gemm(x, w_view, bias, a_view, b_view, y, xa, adapters, scales, rows_per_stream, n_streams,
                 N, K, R, compute_y):
    """x [rows, K]; w_view (stride_n, stride_k); a_view (stride_a, stride_r, stride_k);
    b_view (stride_a, stride_n, stride_r) -- strides describing W as [N, K], A as [n, R, K], B as [n, N, R]."""
    interp = on_interpreter(x)
    upcast, dot_prec, epi_prec = _precisions(x.dtype, interp)
    r_pad = _r_pad(R)
    has_bias = bias is not None
    y_arg = y if y is not None else xa            # unused when compute_y is False
    ym, yn = (y.stride(0), y.stride(1)) if y is not None else (0, 0)
    args = (x, w_view[0], bias if has_bias else x, a_view[0], b_view[0], y_arg, xa, adapters, scales,
            rows_per_stream, N, K, R, n_streams,
            x.stride(0), x.stride(1), w_view[1], w_view[2],
            a_view[1], a_view[2], a_view[3], b_view[1], b_view[2], b_view[3],
            ym, yn, xa.stride(0), _rows_bucket(rows_per_stream))
    consts = dict(HAS_BIAS=has_bias, COMPUTE_Y=compute_y, UPCAST=upcast, DOT_PREC=dot_prec, EPI_PREC=epi_prec,
                  R_PAD=r_pad)

    def grid(meta):
        tiles = n_streams * triton.cdiv(rows_per_stream, meta["BLOCK_M"])
        if compute_y:
            tiles *= triton.cdiv(triton.cdiv(N, meta["BLOCK_N"]), meta["N_GROUP"])
        return (tiles,)

    with device_guard(x):
        if _fixed_config(x):
            _lora_gemm_kernel[grid(_INTERP_GEMM)](*args, **consts, **_INTERP_GEMM)
        else:
            _gemm_tuned[grid](*args, **consts)


def _launch_wgrad(g, q, rows_per_stream, lora_streams_t, n_lora, scales, BIG, R):
    """fp32 [n_lora, BIG, R] = per adapter stream l: s_l · g[rows_l]ᵀ · q[rows_l]."""
    interp = on_interpreter(g)
    upcast, dot_prec, _ = _precisions(g.dtype, interp)
    r_pad = _r_pad(R)
    # Enough programs to fill the GPU: split each stream's rows into chunks (a fixed 128-wide tile assumed
    # here so the chunking, and with it the summation order, does not depend on the tuned config).
    # Under the interpreter a small target and 16-row chunks, so CPU tests cover several (and empty) chunks.
    target, min_chunk = (8, 16) if interp else (2 * _sm_count(g.device), 64)
    tiles = n_lora * triton.cdiv(BIG, 128)
    n_chunks = max(1, min(triton.cdiv(rows_per_stream, min_chunk), triton.cdiv(target, tiles)))
    part = torch.empty(n_lora, n_chunks, BIG, R, device=g.device, dtype=torch.float32)
    if BIG == 0:
        return part.sum(1)
    args = (g, q, part, scales, lora_streams_t, rows_per_stream, BIG, R, n_chunks,
            g.stride(0), g.stride(1), q.stride(0), q.stride(1), part.stride(0), part.stride(1), part.stride(2),
            _rows_bucket(rows_per_stream))
    consts = dict(UPCAST=upcast, DOT_PREC=dot_prec, R_PAD=r_pad)

    def grid(meta):
        return (n_lora * n_chunks * triton.cdiv(BIG, meta["BLOCK_BIG"]),)

    with device_guard(g):
        if _fixed_config(g):
            _lora_wgrad_kernel[grid(_INTERP_WGRAD)](*args, **consts, **_INTERP_WGRAD)
        else:
            _wgrad_tuned[grid](*args, **consts)
    return part.sum(1)                                           # fixed order: deterministic


@functools.lru_cache(maxsize=None)
def _sm_count_cached(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    return _sm_count_cached(device.index if device.index is not None else torch.cuda.current_device())


def _split(stream_adapters, scaling, rows, device):
    S = len(stream_adapters)
    m = rows_per_stream(rows, S)
    meta = _stream_meta(tuple(int(a) for a in stream_adapters), tuple(float(s) for s in scaling), device)
    return S, m, meta


# ============================================================================================ public
def lora_linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: Sequence[float],
                        stream_adapters: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch for all streams. Returns y [rows, N] (x's dtype) and xa [rows, r] (fp32; rows of base
    streams unspecified). Arguments are validated by ops.lora_linear; this checks only what the kernel adds."""
    _check_dtype_device(x)
    if x.dim() != 2:
        raise ValueError(f"x: expected [rows, K], got shape {tuple(x.shape)}")
    rows, K = x.shape
    N = weight.shape[0]
    n, r = lora_A.shape[0], lora_A.shape[1]
    if r > MAX_RANK:
        raise ValueError(f"lora_A: rank {r} above the triton kernel's maximum {MAX_RANK}")
    S, rps, (adapters, scales, _, _) = _split(stream_adapters, scaling, rows, x.device)
    y = torch.empty(rows, N, device=x.device, dtype=x.dtype)
    xa = torch.empty(rows, r, device=x.device, dtype=torch.float32)
    if rows == 0 or N == 0:
        return y, xa
    A = lora_A if n else x.new_zeros(1, r, K)       # no adapters at all: a valid (never read) pointer
    B = lora_B if n else x.new_zeros(1, N, r)
    if bias is not None:
        bias = bias.contiguous()                    # the kernel reads bias[n] at bias_ptr + n
    _launch_gemm(x, (weight, weight.stride(0), weight.stride(1)), bias,
                 (A, A.stride(0), A.stride(1), A.stride(2)), (B, B.stride(0), B.stride(1), B.stride(2)),
                 y, xa, adapters, scales, rps, S, N, K, r, compute_y=True)
    return y, xa


def lora_linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                         lora_B: torch.Tensor, xa: torch.Tensor, scaling: Sequence[float],
                         stream_adapters: Sequence[int], need_dx: bool
                         ) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """dx (if need_dx) = dY·W (+ s·(dY·B)·A on adapter streams); dA, dB in the parameters' dtype (fp32
    accumulation; zero for adapters no stream uses). lora_A / lora_B may be fp32 master weights of a 16-bit x."""
    _check_dtype_device(x)
    rows, K = x.shape
    N = weight.shape[0]
    n, r = lora_A.shape[0], lora_A.shape[1]
    if r > MAX_RANK:
        raise ValueError(f"lora_A: rank {r} above the triton kernel's maximum {MAX_RANK}")
    if dy.dtype != x.dtype:
        raise ValueError(f"dy: dtype {dy.dtype} differs from x's {x.dtype}")
    S, rps, (adapters, scales, lora_streams_t, lora_streams) = _split(stream_adapters, scaling, rows, x.device)
    dA = torch.zeros_like(lora_A)
    dB = torch.zeros_like(lora_B)
    dx = torch.empty_like(x) if need_dx else None
    if rows == 0:
        if dx is not None:
            dx.zero_()
        return dx, dA, dB
    gB = torch.empty(rows, r, device=x.device, dtype=torch.float32)
    # fp32 master adapters are read rounded to x's dtype, as in the forward; dA, dB stay in their dtype.
    A = lora_A.to(x.dtype) if n else x.new_zeros(1, r, K)
    B = lora_B.to(x.dtype) if n else x.new_zeros(1, N, r)
    # dY·W + s·(dY·B)·A is the forward kernel on transposed views: W as [K, N], B as the shrink [r, N],
    # A as the expand [K, r]; it writes gB = dY·B[a] for the adapter rows on the way.
    # Without dx (or with K == 0, where dx is empty) only gB is needed: the same kernel in shrink-only mode.
    full = need_dx and K > 0
    if full or lora_streams:
        _launch_gemm(dy, (weight, weight.stride(1), weight.stride(0)), None,
                     (B, B.stride(0), B.stride(2), B.stride(1)), (A, A.stride(0), A.stride(2), A.stride(1)),
                     dx if full else None, gB, adapters, scales, rps, S, K, N, r, compute_y=full)
    if not lora_streams:
        return dx, dA, dB
    n_lora = len(lora_streams)
    part_B = _launch_wgrad(dy, xa, rps, lora_streams_t, n_lora, scales, N, r)      # [L, N, r]
    part_A = _launch_wgrad(x, gB, rps, lora_streams_t, n_lora, scales, K, r)       # [L, K, r] = dAᵀ
    for a in sorted({stream_adapters[s] for s in lora_streams}):
        idx = [i for i, s in enumerate(lora_streams) if stream_adapters[s] == a]
        sel = idx[0] if len(idx) == 1 else idx
        pb, pa = part_B[sel], part_A[sel]
        if len(idx) > 1:
            pb, pa = pb.sum(0), pa.sum(0)
        dB[a] = pb.to(dB.dtype)
        dA[a] = pa.T.to(dA.dtype)
    return dx, dA, dB
