"""Triton kernels for ops.linear_logprobs: the LM head fused with per-token log-probs, entropy and KL.

No autograd here (hydra_kernels.ops.linear_logprobs wraps these). Logits z = (h · Wᵀ + b) / temperature are
built tile by tile in an fp32 accumulator and never stored, never rounded to a 16-bit type; the bias b (a biased
LM head, HAS_BIAS) is added to the accumulator in fp32, tile by tile, and to the target logit.

Forward (`_fwd_kernel`), split-vocab. Grid (axis 0 only) = token blocks × vocab splits, split index fastest.
A program owns BT tokens of ALL streams (up to 4 per launch) and one contiguous vocabulary range. For each
[BV] vocab tile it loads the W tile once per K step and feeds it to one tl.dot per stream (S accumulators of
[BT, BV], fp32), then updates per stream, online: the row max m, l = Σ e^{z−m}, b = Σ e^{z−m}(z−m) (entropy),
and for kl="full" a = Σ e^{z0−m0}((z0−m0) − (z1−m1)) between streams 0 and 1 (only e^{z0−m0} of stream 0 is
kept while stream 1's tile max is found, to bound registers). Columns past V are −inf (never 0: no phantom
tokens). The target logit is a row gather h·W[target] done once per token block (in split 0), not picked out
of every tile. It writes these partial statistics per (split, stream, token); the host merges the splits
(ops/linear_logprobs.py `_combine`, a few [splits, S, T] elementwise ops).
Why split the vocabulary: at 4096 tokens and BT=128 a token-block-only grid has 32 programs for 132 SMs.
With the split index fastest, the programs resident at one time cover a compact (token blocks × vocab splits)
rectangle: each hidden block is re-read by several programs and each W tile by many, mostly from L2 (the
hidden blocks are re-read once per vocab tile; without that sharing they would stream from HBM).

Backward (`_dz_kernel`) recomputes the logits of a [BT, BV] tile from h and W (same K loop), forms
dz = p·(−c_lp − c_H·(log p + H) + c_K·(log p0 − log p1 − KL)) + c_lp·[v = target], scaled by 1/temperature,
and stores it into a bounded chunk buffer (see ops/linear_logprobs.py for why the two contractions
dH = dz·W and dW = dzᵀ·h then run as cuBLAS GEMMs). One launch handles one stream or a pair sharing the
W tile; for the KL term the pair is (0, 1) and stream 1's logits are recomputed alongside.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hydra_kernels.kernels.triton import device_guard, skip_listed, triton_interpreting

MAX_STREAMS = 4      # streams per forward launch (one fp32 [BT, BV] accumulator each)

_INTERPRET = triton_interpreting()

if _INTERPRET:
    # The interpreter runs every tile op in numpy: one small config, no autotuning.
    _FWD_CONFIGS = [triton.Config({"BT": 16, "BV": 32, "BK": 16}, num_warps=4, num_stages=1)]
    _DZ_CONFIGS = [triton.Config({"BT": 16, "BV": 32, "BK": 16, "GROUP": 4}, num_warps=4, num_stages=1)]
    # Vocab splits are whole multiples of this many columns (a multiple of every BV), so only the last split
    # can end in a partial tile.
    SPLIT_ALIGN = 32
else:
    # Every config below compiles for sm_90 (wgmma, pipelined) with no or negligible register spills at
    # S = 1 and 2 (checked offline with triton 3.9's triton.compile for GPUTarget("cuda", 90, 32); the last
    # forward one spills 32 bytes at S = 1 and more at S = 2: the autotuner decides).
    _FWD_CONFIGS = [
        triton.Config({"BT": bt, "BV": bv, "BK": bk}, num_warps=w, num_stages=st)
        for bt, bv, bk, w, st in [
            (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 3), (64, 128, 64, 8, 4),
            (128, 64, 64, 8, 4), (128, 64, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 32, 8, 5),
            (128, 256, 64, 8, 3), (64, 64, 64, 4, 4),
        ]
    ]
    _DZ_CONFIGS = [
        triton.Config({"BT": bt, "BV": bv, "BK": bk, "GROUP": 8}, num_warps=w, num_stages=st)
        for bt, bv, bk, w, st in [
            (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4),
            (128, 64, 64, 4, 4), (64, 256, 64, 8, 3),
        ]
    ]
    SPLIT_ALIGN = 256


@triton.jit
def _load_w(w_ptr, wp, offs_k, col_ok, k0, D, EVEN_D: tl.constexpr):
    """The [BK, BV] tile Wᵀ[k0:k0+BK, cols] (w_ptr already points at the tile's first vocab row)."""
    if EVEN_D:
        w = tl.load(w_ptr + wp + k0, mask=col_ok[None, :], other=0.0)
    else:
        w = tl.load(w_ptr + wp + k0, mask=col_ok[None, :] & ((k0 + offs_k) < D)[:, None], other=0.0)
    return w


@triton.jit
def _dot_stream(h_ptr, hp, w, offs_k, row_ok, k0, D, acc, EVEN_D: tl.constexpr, FP32: tl.constexpr):
    """acc += h[rows, k0:k0+BK] · w (h_ptr already points at the block's first token row)."""
    if EVEN_D:
        x = tl.load(h_ptr + hp + k0, mask=row_ok[:, None], other=0.0)
    else:
        x = tl.load(h_ptr + hp + k0, mask=row_ok[:, None] & ((k0 + offs_k) < D)[None, :], other=0.0)
    if FP32:
        # fp32 inputs: full-precision products (the default would round operands to tf32). Also bf16 under
        # the interpreter, whose bf16 dot is broken (fp32 holds bf16 values and their products exactly).
        acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, w, acc)
    return acc


@triton.jit
def _logits(acc, inv_t, valid):
    return tl.where(valid, acc * inv_t, float("-inf"))


@triton.jit
def _fold(z, m_new, valid, m, l, b):
    """Fold one [BT, BV] tile of logits z (−inf at masked columns) into the running stats of each row, given
    the new row max m_new. Returns e = e^{z−m_new} (0 at masked columns), Σ e·(z−m_new) of this tile,
    the rescale factor alpha = e^{m−m_new}, the shift m − m_new (0 while the row is still empty, so that
    0·(−inf) never happens), and the new l, b."""
    zc = tl.where(valid, z - m_new[:, None], 0.0)
    e = tl.where(valid, tl.exp(zc), 0.0)
    ez = tl.sum(e * zc, 1)
    alpha = tl.exp(m - m_new)
    shift = tl.where(l > 0, m - m_new, 0.0)
    b = alpha * (b + l * shift) + ez
    l_new = alpha * l + tl.sum(e, 1)
    return e, ez, alpha, shift, l_new, b


@triton.jit
def _target_dot(h_ptr, hp, wt, k_ok, row_ok, k0, acc):
    """acc += Σ_k h[row, k]·W[target[row], k] over one K step, in fp32 (16-bit products are exact in fp32)."""
    x = tl.load(h_ptr + hp + k0, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
    return acc + tl.sum(x.to(tl.float32) * wt, 1)


@triton.jit
def _store_stats(part_ptr, split, s, S: tl.constexpr, T, rows, row_ok, m, l, b, tz):
    base = part_ptr + ((split * S + s) * 4).to(tl.int64) * T
    tl.store(base + rows, m, mask=row_ok)
    tl.store(base + T + rows, l, mask=row_ok)
    tl.store(base + 2 * T + rows, b, mask=row_ok)
    tl.store(base + 3 * T + rows, tz, mask=row_ok)


def _fits_registers(configs, streams):
    """Keep the per-stream fp32 [BT, BV] accumulators within 2 × [128, 128] (more spills heavily on sm_90:
    the dz kernel at BT=128, BV=256 with two streams spills ~1.7 KB per thread, Triton 3.9 and 3.6)."""
    kept = [c for c in configs if c.kwargs["BT"] * c.kwargs["BV"] * streams <= 2 * 128 * 128]
    return kept or configs[-1:]


def _prune_fwd(configs, named_args, **kwargs):
    streams = kwargs.get("S", named_args.get("S", 1))
    return skip_listed("linear_logprobs_fwd", _fits_registers(configs, streams), streams=streams,
                       fp32=bool(kwargs.get("FP32", named_args.get("FP32", False))))


def _prune_dz(configs, named_args, **kwargs):
    streams = kwargs.get("NS", named_args.get("NS", 1))
    return skip_listed("linear_logprobs_dz", _fits_registers(configs, streams), streams=streams,
                       fp32=bool(kwargs.get("FP32", named_args.get("FP32", False))))


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "S", "KL_FULL", "FP32", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": _prune_fwd})
@triton.jit
def _fwd_kernel(h0_ptr, h1_ptr, h2_ptr, h3_ptr, w_ptr, b_ptr, tgt_ptr, inv_t_ptr, part_ptr, klpart_ptr,
                T, V, D, stride_ht, stride_wv, n_splits, split_cols,
                S: tl.constexpr, KL_FULL: tl.constexpr, FP32: tl.constexpr, EVEN_D: tl.constexpr,
                HAS_BIAS: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    split = pid % n_splits
    tb = pid // n_splits
    v_begin = split * split_cols
    v_end = tl.minimum(V, v_begin + split_cols)

    offs_t = tl.arange(0, BT)
    offs_k = tl.arange(0, BK)
    offs_v = tl.arange(0, BV)
    rows = tb * BT + offs_t
    row_ok = rows < T
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    inv_t = tl.load(inv_t_ptr)
    # 64-bit scalar bases, 32-bit in-tile offsets (fewer address registers next to S accumulators).
    h_off = (tb * BT).to(tl.int64) * stride_ht
    hp = offs_t[:, None] * stride_ht + offs_k[None, :]
    wp = offs_v[None, :] * stride_wv + offs_k[:, None]

    zero = tl.zeros([BT], dtype=tl.float32)
    m0 = zero + float("-inf")
    l0 = zero
    b0 = zero
    t0 = zero
    m1 = m0
    l1 = zero
    b1 = zero
    t1 = zero
    m2 = m0
    l2 = zero
    b2 = zero
    t2 = zero
    m3 = m0
    l3 = zero
    b3 = zero
    t3 = zero
    a01 = zero

    for v0 in range(v_begin, v_end, BV):
        cols = v0 + offs_v
        col_ok = cols < v_end
        w_tile = w_ptr + tl.cast(v0, tl.int64) * stride_wv
        acc0 = tl.zeros([BT, BV], dtype=tl.float32)
        acc1 = acc0
        acc2 = acc0
        acc3 = acc0
        for k0 in range(0, D, BK):
            # One W tile per K step serves every stream.
            w = _load_w(w_tile, wp, offs_k, col_ok, k0, D, EVEN_D)
            acc0 = _dot_stream(h0_ptr + h_off, hp, w, offs_k, row_ok, k0, D, acc0, EVEN_D, FP32)
            if S > 1:
                acc1 = _dot_stream(h1_ptr + h_off, hp, w, offs_k, row_ok, k0, D, acc1, EVEN_D, FP32)
            if S > 2:
                acc2 = _dot_stream(h2_ptr + h_off, hp, w, offs_k, row_ok, k0, D, acc2, EVEN_D, FP32)
            if S > 3:
                acc3 = _dot_stream(h3_ptr + h_off, hp, w, offs_k, row_ok, k0, D, acc3, EVEN_D, FP32)

        valid = col_ok[None, :]
        if HAS_BIAS:
            # The same bias row serves every stream; masked columns become −inf in _logits all the same.
            bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            acc0 += bias
            if S > 1:
                acc1 += bias
            if S > 2:
                acc2 += bias
            if S > 3:
                acc3 += bias
        z0 = _logits(acc0, inv_t, valid)
        m0n = tl.maximum(m0, tl.max(z0, 1))
        e0, ez0, alpha0, shift0, l0n, b0 = _fold(z0, m0n, valid, m0, l0, b0)
        if S > 1:
            z1 = _logits(acc1, inv_t, valid)
            m1n = tl.maximum(m1, tl.max(z1, 1))
            if KL_FULL:
                # a = Σ e^{z0−m0}((z0−m0) − (z1−m1)), re-referenced to both new maxima; uses l0 before
                # this tile. Only e0 is kept from stream 0 while stream 1's max is found.
                cross = tl.sum(e0 * tl.where(valid, z1 - m1n[:, None], 0.0), 1)
                shift1 = tl.where(l1 > 0, m1 - m1n, 0.0)
                a01 = alpha0 * (a01 + l0 * (shift0 - shift1)) + (ez0 - cross)
            e1, ez1, alpha1, shift1, l1, b1 = _fold(z1, m1n, valid, m1, l1, b1)
            m1 = m1n
        m0 = m0n
        l0 = l0n
        if S > 2:
            z2 = _logits(acc2, inv_t, valid)
            m2n = tl.maximum(m2, tl.max(z2, 1))
            e2, ez2, alpha2, shift2, l2, b2 = _fold(z2, m2n, valid, m2, l2, b2)
            m2 = m2n
        if S > 3:
            z3 = _logits(acc3, inv_t, valid)
            m3n = tl.maximum(m3, tl.max(z3, 1))
            e3, ez3, alpha3, shift3, l3, b3 = _fold(z3, m3n, valid, m3, l3, b3)
            m3 = m3n

    # Target logits: a row gather of W[target] dotted with h, once per token block (in split 0; the other
    # splits report 0). Picking them out of the logit tiles would need a [BT, BV] column-index compare per
    # tile, which costs ~70 registers next to the accumulators.
    if split == 0:
        tgt_ok = row_ok & (tgt >= 0) & (tgt < V)
        w_rows = w_ptr + tl.where(tgt_ok, tgt, 0).to(tl.int64)[:, None] * stride_wv + offs_k[None, :]
        for k0 in range(0, D, BK):
            k_ok = (k0 + offs_k) < D
            wt = tl.load(w_rows + k0, mask=tgt_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            t0 = _target_dot(h0_ptr + h_off, hp, wt, k_ok, row_ok, k0, t0)
            if S > 1:
                t1 = _target_dot(h1_ptr + h_off, hp, wt, k_ok, row_ok, k0, t1)
            if S > 2:
                t2 = _target_dot(h2_ptr + h_off, hp, wt, k_ok, row_ok, k0, t2)
            if S > 3:
                t3 = _target_dot(h3_ptr + h_off, hp, wt, k_ok, row_ok, k0, t3)
        if HAS_BIAS:
            bt = tl.load(b_ptr + tl.where(tgt_ok, tgt, 0), mask=tgt_ok, other=0.0).to(tl.float32)
            t0 += bt
            t1 += bt
            t2 += bt
            t3 += bt
        t0 = t0 * inv_t
        t1 = t1 * inv_t
        t2 = t2 * inv_t
        t3 = t3 * inv_t

    _store_stats(part_ptr, split, 0, S, T, rows, row_ok, m0, l0, b0, t0)
    if S > 1:
        _store_stats(part_ptr, split, 1, S, T, rows, row_ok, m1, l1, b1, t1)
    if S > 2:
        _store_stats(part_ptr, split, 2, S, T, rows, row_ok, m2, l2, b2, t2)
    if S > 3:
        _store_stats(part_ptr, split, 3, S, T, rows, row_ok, m3, l3, b3, t3)
    if KL_FULL:
        tl.store(klpart_ptr + split.to(tl.int64) * T + rows, a01, mask=row_ok)


@triton.autotune(configs=_DZ_CONFIGS, key=["D", "NS", "KL_GRAD", "WRITE_B", "FP32", "HAS_BIAS"],
                 prune_configs_by={"early_config_prune": _prune_dz})
@triton.jit
def _dz_kernel(ha_ptr, hb_ptr, w_ptr, b_ptr, tgt_ptr, inv_t_ptr, rowa_ptr, rowb_ptr, klrow_ptr, dza_ptr, dzb_ptr,
               T, t_begin, n_rows, v_begin, n_cols, D, stride_ht, stride_wv, stride_dz,
               NS: tl.constexpr, KL_GRAD: tl.constexpr, WRITE_B: tl.constexpr, FP32: tl.constexpr,
               EVEN_D: tl.constexpr, HAS_BIAS: tl.constexpr, BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
               GROUP: tl.constexpr):
    """dz for the chunk tokens [t_begin, t_begin+n_rows) × vocab [v_begin, v_begin+n_cols) of stream a
    (and b when NS == 2). Per-row inputs rowX = [4, T] fp32: (lse, entropy, c_lp, c_H); klrow = [2, T]
    (KL, c_K). dz buffers are [n_rows, n_cols] with row stride stride_dz, indexed from the chunk origin."""
    pid = tl.program_id(0)
    n_tb = tl.cdiv(n_rows, BT)
    n_vb = tl.cdiv(n_cols, BV)
    # Grouped order: GROUP token blocks sweep the vocab tiles together, so W tiles are reused from L2.
    per_group = GROUP * n_vb
    first_tb = (pid // per_group) * GROUP
    gsize = tl.minimum(n_tb - first_tb, GROUP)
    tb = first_tb + (pid % per_group) % gsize
    vb = (pid % per_group) // gsize

    offs_t = tl.arange(0, BT)
    offs_v = tl.arange(0, BV)
    offs_k = tl.arange(0, BK)
    lrows = tb * BT + offs_t
    lcols = vb * BV + offs_v
    row_ok = lrows < n_rows
    col_ok = lcols < n_cols
    rows = t_begin + lrows
    cols = v_begin + lcols
    h_off = (t_begin + tb * BT).to(tl.int64) * stride_ht
    hp = offs_t[:, None] * stride_ht + offs_k[None, :]
    w_tile = w_ptr + (v_begin + vb * BV).to(tl.int64) * stride_wv
    wp = offs_v[None, :] * stride_wv + offs_k[:, None]

    acc_a = tl.zeros([BT, BV], dtype=tl.float32)
    acc_b = acc_a
    for k0 in range(0, D, BK):
        w = _load_w(w_tile, wp, offs_k, col_ok, k0, D, EVEN_D)
        acc_a = _dot_stream(ha_ptr + h_off, hp, w, offs_k, row_ok, k0, D, acc_a, EVEN_D, FP32)
        if NS > 1:
            acc_b = _dot_stream(hb_ptr + h_off, hp, w, offs_k, row_ok, k0, D, acc_b, EVEN_D, FP32)
    if HAS_BIAS:
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        acc_a += bias
        if NS > 1:
            acc_b += bias

    inv_t = tl.load(inv_t_ptr)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    is_tgt = cols[None, :] == tgt[:, None]
    out_ok = row_ok[:, None] & col_ok[None, :]
    dz_base = (tb * BT).to(tl.int64) * stride_dz + vb * BV
    dz_off = offs_t[:, None] * stride_dz + offs_v[None, :]

    lse_a = tl.load(rowa_ptr + rows, mask=row_ok, other=0.0)
    ent_a = tl.load(rowa_ptr + T + rows, mask=row_ok, other=0.0)
    clp_a = tl.load(rowa_ptr + 2 * T + rows, mask=row_ok, other=0.0)
    ch_a = tl.load(rowa_ptr + 3 * T + rows, mask=row_ok, other=0.0)
    # dz = p·(alpha + beta·log p [+ c_K·(log p − log p_b)]) + c_lp·[target]: per-row alpha, beta.
    alpha_a = -clp_a - ch_a * ent_a
    beta_a = -ch_a
    if NS > 1:
        lse_b = tl.load(rowb_ptr + rows, mask=row_ok, other=0.0)
        ub = acc_b * inv_t - lse_b[:, None]
        if WRITE_B:
            ent_b = tl.load(rowb_ptr + T + rows, mask=row_ok, other=0.0)
            clp_b = tl.load(rowb_ptr + 2 * T + rows, mask=row_ok, other=0.0)
            ch_b = tl.load(rowb_ptr + 3 * T + rows, mask=row_ok, other=0.0)
            dzb = tl.exp(ub) * ((-clp_b - ch_b * ent_b)[:, None] - ch_b[:, None] * ub)
            dzb = (dzb + tl.where(is_tgt, clp_b[:, None], 0.0)) * inv_t
            tl.store(dzb_ptr + dz_base + dz_off, dzb.to(dzb_ptr.dtype.element_ty), mask=out_ok)
    ua = acc_a * inv_t - lse_a[:, None]              # log p
    if KL_GRAD:
        kl = tl.load(klrow_ptr + rows, mask=row_ok, other=0.0)
        ck = tl.load(klrow_ptr + T + rows, mask=row_ok, other=0.0)
        inner_a = (alpha_a - ck * kl)[:, None] + (beta_a + ck)[:, None] * ua - ck[:, None] * ub
    else:
        inner_a = alpha_a[:, None] + beta_a[:, None] * ua
    dza = tl.exp(ua) * inner_a
    dza = (dza + tl.where(is_tgt, clp_a[:, None], 0.0)) * inv_t
    tl.store(dza_ptr + dz_base + dz_off, dza.to(dza_ptr.dtype.element_ty), mask=out_ok)


# ------------------------------------------------------------------------------------------ launchers
def _ieee_dot(dtype: torch.dtype) -> bool:
    """Dots in fp32 'ieee' precision: fp32 inputs, and bf16 under the interpreter."""
    return dtype == torch.float32 or (_INTERPRET and dtype == torch.bfloat16)


def _inv_t(temperature: float, device) -> torch.Tensor:
    # A one-element fp32 tensor: never a Python float kernel argument (no fp64 under Inductor, no recompiles).
    return torch.full((1,), 1.0 / temperature, dtype=torch.float32, device=device)


def forward_partials(hidden: list[torch.Tensor], weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                     kl_full: bool, n_splits: int | None = None, *, bias: torch.Tensor | None = None):
    """Partial statistics of every (vocab split, stream, token).

    hidden: S tensors [T, D] (rows contiguous), weight [V, D] contiguous, targets [T] int64, bias [V] contiguous
    or None.
    Returns part [n_splits, S, 4, T] fp32 = (max, Σe^{z−max}, Σe^{z−max}(z−max), target logit or 0) and
    klpart [n_splits, T] (the stream-0/1 cross term) or None. Streams beyond MAX_STREAMS go in further
    launches; the KL pair (0, 1) is always in the first.
    """
    S = len(hidden)
    T, D = hidden[0].shape
    V = weight.shape[0]
    dev = weight.device
    if n_splits is None:
        n_splits = default_splits(V)
    split_cols = triton.cdiv(triton.cdiv(V, n_splits), SPLIT_ALIGN) * SPLIT_ALIGN
    n_splits = triton.cdiv(V, split_cols)          # every split holds at least one real column
    part = torch.empty(n_splits, S, 4, T, dtype=torch.float32, device=dev)
    klpart = torch.empty(n_splits, T, dtype=torch.float32, device=dev) if kl_full else None
    inv_t = _inv_t(temperature, dev)
    fp32 = _ieee_dot(hidden[0].dtype)
    stride_ht = hidden[0].stride(0)
    for g0 in range(0, S, MAX_STREAMS):
        group = hidden[g0:g0 + MAX_STREAMS]
        ptrs = group + [group[0]] * (MAX_STREAMS - len(group))
        sub = part[:, g0:g0 + len(group)]
        out = sub if sub.is_contiguous() else torch.empty_like(sub)

        def grid(meta):
            return (triton.cdiv(T, meta["BT"]) * n_splits,)

        with device_guard(weight):
            _fwd_kernel[grid](*ptrs, weight, weight if bias is None else bias, targets, inv_t, out,
                              klpart if (kl_full and g0 == 0) else part,
                              T, V, D, stride_ht, weight.stride(0), n_splits, split_cols,
                              S=len(group), KL_FULL=bool(kl_full and g0 == 0), FP32=fp32, EVEN_D=(D % 64 == 0),
                              HAS_BIAS=bias is not None)
        if out is not sub:
            sub.copy_(out)
    return part, klpart


def default_splits(V: int) -> int:
    """Vocab splits for the forward. Under the interpreter one split; on a GPU enough that a wave of
    resident programs shares hidden blocks and W tiles through L2 (tune on the device)."""
    if _INTERPRET:
        return 1
    return max(1, min(16, V // 4096))


def dz_chunk(hidden: list[torch.Tensor], weight: torch.Tensor, targets: torch.Tensor, temperature: float,
             rowdata: torch.Tensor, klrow: torch.Tensor | None, pair: tuple[int, int | None], kl_grad: bool,
             write_b: bool, dz_a: torch.Tensor, dz_b: torch.Tensor | None, t_begin: int, v_begin: int, *,
             bias: torch.Tensor | None = None) -> None:
    """Fill dz_a (and dz_b) [n_rows, n_cols] for stream pair[0] (and pair[1]) over the chunk whose origin is
    (t_begin, v_begin). rowdata: [S, 4, T] fp32 per-row inputs; klrow: [2, T] fp32 (KL, c_K) or None; bias: the
    LM head's [V] (contiguous) or None."""
    a, b = pair
    n_rows, n_cols = dz_a.shape
    T, D = hidden[0].shape
    ns = 1 if b is None else 2
    if ns == 1:
        kl_grad = write_b = False
    hb = hidden[b] if ns == 2 else hidden[a]
    rowb = rowdata[b] if ns == 2 else rowdata[a]
    dzb = dz_b if write_b else dz_a
    if dzb.stride(0) != dz_a.stride(0) or dz_a.stride(1) != 1 or dzb.stride(1) != 1:
        raise ValueError("dz_a: dz buffers must share a row stride and have unit column stride")

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BT"]) * triton.cdiv(n_cols, meta["BV"]),)

    with device_guard(weight):
        _dz_kernel[grid](hidden[a], hb, weight, weight if bias is None else bias, targets,
                         _inv_t(temperature, weight.device), rowdata[a], rowb,
                         klrow if kl_grad else rowdata[a], dz_a, dzb,
                         T, t_begin, n_rows, v_begin, n_cols, D, hidden[0].stride(0), weight.stride(0),
                         dz_a.stride(0), NS=ns, KL_GRAD=bool(kl_grad), WRITE_B=bool(write_b),
                         FP32=_ieee_dot(hidden[0].dtype), EVEN_D=(D % 64 == 0), HAS_BIAS=bias is not None)
