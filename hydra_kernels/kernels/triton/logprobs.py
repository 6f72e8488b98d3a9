"""Triton kernels: per-token log-probs, KL and entropy from stored logits (one pass forward, one pass backward).

No autograd here; `hydra_kernels.ops.logprobs` wraps these launchers. The CUDA backend
(`hydra_kernels.kernels.cuda`) implements the same two functions with the same signatures, so the op can
call either one unchanged.

Launcher contract (shared by the `triton` and `cuda` backends)
==============================================================

    logprobs_and_kl_forward(logits, ref_logits, targets, temperature: float, kl: str, ignore_index: int)
        -> (logp, ref_logp, kl_out, entropy, stats)

    logprobs_and_kl_backward(grad_logp, grad_kl, grad_entropy, logits, ref_logits, targets,
                             logp, ref_logp, kl_out, entropy, stats,
                             temperature: float, kl: str, ignore_index: int) -> dlogits

Inputs (the op validates everything before calling; launchers assume valid input):
  logits      [B, T, V] float32 / bfloat16 / float16, stride(-1) == 1; B and T may have any strides
              (e.g. a `logits[:, :-1]` slice). Rows are numbered r = b*T + t. N = B*T rows.
  ref_logits  None, or [B, T, V] with logits' dtype and device, stride(-1) == 1, its own B/T strides.
              None means "log-probs only" (the `token_logprobs` op): kl must be "none".
  targets     [N] int64, contiguous (row r's target). targets[r] == ignore_index marks an ignored row.
              A target outside [0, V) that is not ignore_index gives NaN outputs (never an out-of-bounds read).
  temperature Python float > 0; z = logits * (1 / temperature) in fp32 (a multiply, not a divide: the
              kernel has no instructions to spare; the two differ by at most 1 ulp of z). 1/temperature is
              a compile-time constant of the kernel (never a float64 runtime argument).
  kl          "none" (ref_logits is None), "k1" | "k2" | "k3" (sampled-token estimators of KL(pi||pi_ref)
              from the two target log-probs, d = ref_logp - logp: k1 = -d, k2 = d^2/2, k3 = e^d - 1 - d),
              or "full" (exact sum over the vocabulary of p (log p - log p_ref)); names and mode ids:
              hydra_kernels/kernels/kl.py.

Forward outputs, all float32, all [N], all exactly 0 on ignored rows:
  logp        log softmax(z)[target]
  ref_logp    log softmax(z_ref)[target]                    (shape [0] when ref_logits is None)
  kl_out      the chosen estimator                          (shape [0] when ref_logits is None)
  entropy     -sum_v p_v log p_v of the actor, 0 log 0 = 0  (shape [0] when ref_logits is None)
  stats       [N, 4] float32, per row: (m, log_s, m_ref, log_s_ref), where m = max_v z_v and
              s = sum_v exp(z_v - m), so logsumexp(z) = m + log_s (same for the reference; the two ref
              columns are 0 when ref_logits is None). Kept as two numbers instead of one lse so that
              z_v - lse = (z_v - m) - log_s stays exact for huge logits (|z| ~ 1e4, where one fp32 lse is
              off by ~1e-3). Ignored rows hold 0 in all four columns.

Backward (recomputes p from logits + stats; no gradient is stored by the forward):
  grad_logp, grad_kl, grad_entropy: [N] float32 contiguous, or None meaning zero. The gradient with
              respect to ref_logp is dropped by the op (the reference is frozen), so it is not an input.
  logp, ref_logp, kl_out, entropy, stats: exactly what the forward returned.
  ref_logits  may be None unless kl == "full" and grad_kl is not None (only then is it read).
  dlogits     [B, T, V] contiguous, in logits' dtype, every element written (0 on ignored rows):
      dz_v = g * ([v == target] - p_v)
             - grad_entropy * p_v * (log p_v + entropy)
             + grad_kl_full * p_v * (log p_v - log p_ref_v - kl_full)
      dlogits = dz / temperature   (a multiply by 1/temperature in the kernel),
  where g = grad_logp + grad_kl * dk/dlogp for the sampled estimators
  (k1: 1, k2: logp - ref_logp, k3: 1 - e^(ref_logp - logp)), and p_v = 0 wherever logits are -inf.

Both launchers also take keyword-only tuning overrides (block_v=, num_warps=), which callers may ignore.
The torch backend (`_torch_forward` / `_torch_backward` in ops/logprobs.py) follows the same contract,
stats included, so any backend's backward can consume any backend's forward outputs (a test checks this).

Numerics: everything accumulates in fp32 with an online max/sum over vocab tiles (one exp per element per
model; the running max is a scalar per row, the running sums are kept per lane and reduced once at the
end). Out-of-range columns of the last tile load as -inf, never 0 (a 0 would add exp(0 - m) "phantom
tokens" to the sum). Entropy and full KL are accumulated in max-shifted form, sum_v e^(z-m) (z-m) and
sum_v e^(z-m) ((z-m) - (z_ref-m_ref)), and rescaled whenever a running max moves, so no term loses digits
against a large logit: entropy = log_s - A/s, kl_full = C/s - log_s + log_s_ref.

Grid: one program per row on axis 0 only (the axis that allows 2^31 - 1 programs), so any number of
tokens works. Ignored rows skip their vocabulary loop in the forward and skip loading in the backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from hydra_kernels.kernels.kl import kl_mode
from hydra_kernels.kernels.triton import device_guard, on_interpreter

__all__ = ["logprobs_and_kl_forward", "logprobs_and_kl_backward"]

# A global used inside kernels must be a tl.constexpr (compiled Triton rejects plain Python globals).
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _k3(d):
    """e^d - 1 - d without cancellation: a Taylor series (to d^10/10!) for |d| < 0.5, the direct form beyond."""
    series = d * d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0 + d * (1.0 / 720.0 + d * (
        1.0 / 5040.0 + d * (1.0 / 40320.0 + d * (1.0 / 362880.0 + d * (1.0 / 3628800.0)))))))))
    return tl.where(tl.abs(d) < 0.5, series, tl.exp(d) - 1.0 - d)


@triton.jit
def _logprobs_fwd_kernel(
    x_ptr, r_ptr, tgt_ptr,
    logp_ptr, rlogp_ptr, kl_ptr, ent_ptr, stats_ptr,
    T_rows, sx_b, sx_t, sr_b, sr_t, V, ignore_index,
    INV_T: tl.constexpr, KL_MODE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    HAS_REF: tl.constexpr = KL_MODE > 0
    FULL: tl.constexpr = KL_MODE == 4
    row = tl.program_id(0).to(tl.int64)
    b = row // T_rows
    t = row - b * T_rows
    x_row = x_ptr + b * sx_b + t * sx_t
    r_row = r_ptr + b * sr_b + t * sr_t

    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    valid = tgt != ignore_index
    in_range = (tgt >= 0) & (tgt < V)
    # Ignored rows run no iterations: prompt and padding tokens cost no bandwidth.
    v_end = tl.where(valid, V, 0)
    offs = tl.arange(0, BLOCK_V)

    # Running max per model is a scalar (one reduction per tile); the sums stay per lane and are reduced
    # once after the loop, so a tile costs one cross-warp reduction per model instead of four.
    # s = sum e^(z-m); a = sum e^(z-m) (z-m) (entropy); c = sum e^(z-m) ((z-m) - (z_ref-m_ref)) (full KL).
    m = tl.zeros((), dtype=tl.float32) + _NEG_INF
    mr = tl.zeros((), dtype=tl.float32) + _NEG_INF
    s = tl.zeros((BLOCK_V,), dtype=tl.float32)
    a = tl.zeros((BLOCK_V,), dtype=tl.float32)
    sr = tl.zeros((BLOCK_V,), dtype=tl.float32)
    c = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for start in range(0, v_end, BLOCK_V):
        cols = start + offs
        cmask = cols < V
        z = tl.load(x_row + cols, mask=cmask, other=_NEG_INF).to(tl.float32)
        if INV_T != 1.0:
            z = z * INV_T
        m_new = tl.maximum(m, tl.max(z, 0))
        # While everything seen is -inf, shift by 0 instead of -inf (avoids inf - inf = NaN).
        m_use = tl.where(m_new == _NEG_INF, 0.0, m_new)
        delta = tl.where(m == _NEG_INF, 0.0, m - m_use)          # how far the running max moved (<= 0)
        alpha = tl.exp(m - m_use)
        zs = z - m_use
        e = tl.exp(zs)
        live = z != _NEG_INF                                    # 0 * log 0 = 0 for masked / -inf entries
        if HAS_REF:
            zr = tl.load(r_row + cols, mask=cmask, other=_NEG_INF).to(tl.float32)
            if INV_T != 1.0:
                zr = zr * INV_T
            mr_new = tl.maximum(mr, tl.max(zr, 0))
            mr_use = tl.where(mr_new == _NEG_INF, 0.0, mr_new)
            delta_r = tl.where(mr == _NEG_INF, 0.0, mr - mr_use)
            alpha_r = tl.exp(mr - mr_use)
            zrs = zr - mr_use
            if FULL:
                c = alpha * (c + (delta - delta_r) * s) + tl.where(live, e * (zs - zrs), 0.0)
            sr = sr * alpha_r + tl.exp(zrs)
            mr = mr_new
            # Entropy rides along only in logprobs_and_kl (token_logprobs skips it).
            a = alpha * (a + delta * s) + tl.where(live, e * zs, 0.0)
        s = s * alpha + e
        m = m_new
    s = tl.sum(s, 0)
    a = tl.sum(a, 0)
    sr = tl.sum(sr, 0)
    c = tl.sum(c, 0)

    # The target's logit: one scalar load (masked so a bad target never reads out of bounds).
    tsafe = tl.where(in_range, tgt, 0)
    zt = tl.load(x_row + tsafe).to(tl.float32)
    if INV_T != 1.0:
        zt = zt * INV_T
    log_s = tl.log(s)
    logp = tl.where(in_range, (zt - m) - log_s, float("nan"))
    tl.store(logp_ptr + row, tl.where(valid, logp, 0.0))
    tl.store(stats_ptr + row * 4 + 0, tl.where(valid, m, 0.0))
    tl.store(stats_ptr + row * 4 + 1, tl.where(valid, log_s, 0.0))
    if HAS_REF:
        zrt = tl.load(r_row + tsafe).to(tl.float32)
        if INV_T != 1.0:
            zrt = zrt * INV_T
        log_sr = tl.log(sr)
        rlogp = tl.where(in_range, (zrt - mr) - log_sr, float("nan"))
        ent = log_s - a / s
        # d = ref_logp - logp regrouped so that huge logits cancel before rounding: with |z| ~ 1e4 each
        # log-prob carries ~1e-3 of fp32 rounding, while (z_ref_t - z_t), (m - m_ref), (log_s - log_sr) do not.
        d = ((zrt - zt) + (m - mr)) + (log_s - log_sr)
        if KL_MODE == 1:
            k = -d
        elif KL_MODE == 2:
            k = 0.5 * d * d
        elif KL_MODE == 3:
            k = _k3(d)
        else:
            k = c / s - log_s + log_sr
        tl.store(rlogp_ptr + row, tl.where(valid, rlogp, 0.0))
        tl.store(kl_ptr + row, tl.where(valid, k, 0.0))
        tl.store(ent_ptr + row, tl.where(valid, ent, 0.0))
        tl.store(stats_ptr + row * 4 + 2, tl.where(valid, mr, 0.0))
        tl.store(stats_ptr + row * 4 + 3, tl.where(valid, log_sr, 0.0))
    else:
        tl.store(stats_ptr + row * 4 + 2, 0.0)
        tl.store(stats_ptr + row * 4 + 3, 0.0)


@triton.jit
def _logprobs_bwd_kernel(
    x_ptr, r_ptr, tgt_ptr, dx_ptr,
    glogp_ptr, gkl_ptr, gent_ptr,
    logp_ptr, rlogp_ptr, kl_ptr, ent_ptr, stats_ptr,
    T_rows, sx_b, sx_t, sr_b, sr_t, V, ignore_index,
    INV_T: tl.constexpr, KL_MODE: tl.constexpr,
    HAS_GLOGP: tl.constexpr, HAS_GKL: tl.constexpr, HAS_GENT: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # The reference logits are read only when the full-KL gradient is needed.
    NEED_REF: tl.constexpr = (KL_MODE == 4) and HAS_GKL
    SAMPLED_KL: tl.constexpr = (KL_MODE >= 1) and (KL_MODE <= 3) and HAS_GKL
    row = tl.program_id(0).to(tl.int64)
    b = row // T_rows
    t = row - b * T_rows
    x_row = x_ptr + b * sx_b + t * sx_t
    r_row = r_ptr + b * sr_b + t * sr_t
    dx_row = dx_ptr + row * V

    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    valid = tgt != ignore_index
    zero = tl.zeros((), dtype=tl.float32)

    # Per-row coefficients; all zero on ignored rows so the row is written as zeros without being read.
    g = zero
    if HAS_GLOGP:
        g += tl.load(glogp_ptr + row)
    if SAMPLED_KL:
        gk = tl.load(gkl_ptr + row)
        lp_t = tl.load(logp_ptr + row)
        rlp_t = tl.load(rlogp_ptr + row)
        if KL_MODE == 1:
            g += gk
        elif KL_MODE == 2:
            g += gk * (lp_t - rlp_t)
        else:
            g += gk * (1.0 - tl.exp(rlp_t - lp_t))
    g = tl.where(valid, g, 0.0)
    gh = zero
    h = zero
    if HAS_GENT:
        gh = tl.where(valid, tl.load(gent_ptr + row), 0.0)
        h = tl.load(ent_ptr + row)
    gf = zero
    kf = zero
    if NEED_REF:
        gf = tl.where(valid, tl.load(gkl_ptr + row), 0.0)
        kf = tl.load(kl_ptr + row)
    m = tl.load(stats_ptr + row * 4 + 0)
    log_s = tl.load(stats_ptr + row * 4 + 1)
    mr = tl.load(stats_ptr + row * 4 + 2)
    log_sr = tl.load(stats_ptr + row * 4 + 3)
    # Folded so that the loop does: dz = p * (coef0 - gh*logp + gf*(logp - logq)) + g*[v == target].
    coef0 = -g - gh * h - gf * kf

    offs = tl.arange(0, BLOCK_V)
    v_load = tl.where(valid, V, 0)             # ignored rows: nothing is read, zeros are written
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        cmask = cols < V
        lmask = cols < v_load
        z = tl.load(x_row + cols, mask=lmask, other=_NEG_INF).to(tl.float32)
        if INV_T != 1.0:
            z = z * INV_T
        live = z != _NEG_INF
        lp = tl.where(live, (z - m) - log_s, 0.0)              # log p (0 where p = 0: no 0 * -inf)
        p = tl.where(live, tl.exp(lp), 0.0)
        inner = coef0 - gh * lp
        if NEED_REF:
            zr = tl.load(r_row + cols, mask=lmask, other=_NEG_INF).to(tl.float32)
            if INV_T != 1.0:
                zr = zr * INV_T
            lq = (zr - mr) - log_sr
            inner += gf * (lp - lq)
        # p = 0 wherever z = -inf; drop the product there (inner may be infinite: a -inf reference logit).
        dz = tl.where(live, p * inner, 0.0) + tl.where(cols == tgt, g, 0.0)
        if INV_T != 1.0:
            dz = dz * INV_T
        tl.store(dx_row + cols, dz.to(dx_ptr.dtype.element_ty), mask=cmask)


# ------------------------------------------------------------------------------------------ launchers
def _block_v(V: int, cap: int) -> int:
    return max(16, min(triton.next_power_of_2(V), cap))


def _launch_cfg(V: int, block_v: int | None, num_warps: int | None, interpreting: bool):
    """Tile width and warps. Wide tiles amortise the per-tile max reduction (a memory-bound kernel has only
    ~16 instructions per bf16 element to spend on an H200); 16 warps keep the register-hungry full-KL variant
    at ~93 registers per thread (sm_90, no spills). The interpreter gets narrow tiles so that the tests run
    several tiles per row (the online rescaling and the masked last tile are then exercised)."""
    if block_v is None:
        block_v = _block_v(V, 256 if interpreting else 4096)
    if num_warps is None:
        num_warps = 4 if block_v <= 1024 else (8 if block_v <= 2048 else 16)
    return block_v, num_warps


def _row_strides(t: torch.Tensor | None):
    if t is None:
        return 0, 0
    return t.stride(0), t.stride(1)


def logprobs_and_kl_forward(logits: torch.Tensor, ref_logits: torch.Tensor | None, targets: torch.Tensor,
                            temperature: float, kl: str, ignore_index: int, *,
                            block_v: int | None = None, num_warps: int | None = None):
    """Forward launcher; see the module docstring for the contract. block_v / num_warps override the tuning."""
    B, T, V = logits.shape
    N = B * T
    mode = kl_mode(kl)
    if (ref_logits is None) != (mode == 0):
        raise ValueError("kl: 'none' goes with ref_logits=None, and only with it")
    dev = logits.device
    f32 = dict(device=dev, dtype=torch.float32)
    logp = torch.empty(N, **f32)
    n_ref = N if ref_logits is not None else 0
    ref_logp, kl_out, entropy = (torch.empty(n_ref, **f32) for _ in range(3))
    stats = torch.empty(N, 4, **f32)
    if N == 0:
        return logp, ref_logp, kl_out, entropy, stats
    bv, nw = _launch_cfg(V, block_v, num_warps, on_interpreter(logits))
    sr_b, sr_t = _row_strides(ref_logits)
    with device_guard(logits):
        _logprobs_fwd_kernel[(N,)](
            logits, ref_logits if ref_logits is not None else logits, targets,
            logp, ref_logp, kl_out, entropy, stats,
            T, logits.stride(0), logits.stride(1), sr_b, sr_t, V, ignore_index,
            INV_T=1.0 / float(temperature), KL_MODE=mode, BLOCK_V=bv, num_warps=nw,
        )
    return logp, ref_logp, kl_out, entropy, stats


def logprobs_and_kl_backward(grad_logp: torch.Tensor | None, grad_kl: torch.Tensor | None,
                             grad_entropy: torch.Tensor | None, logits: torch.Tensor,
                             ref_logits: torch.Tensor | None, targets: torch.Tensor,
                             logp: torch.Tensor, ref_logp: torch.Tensor, kl_out: torch.Tensor,
                             entropy: torch.Tensor, stats: torch.Tensor, temperature: float, kl: str,
                             ignore_index: int, *, block_v: int | None = None, num_warps: int | None = None):
    """Backward launcher; see the module docstring. Returns dlogits [B, T, V] contiguous in logits' dtype."""
    B, T, V = logits.shape
    N = B * T
    mode = kl_mode(kl)
    if mode == 0:                     # no reference: only log-probs exist, nothing else can carry gradient
        grad_kl = grad_entropy = None
    if mode == 4 and grad_kl is not None and ref_logits is None:
        raise ValueError("ref_logits: needed by the backward of kl='full'")
    dlogits = torch.empty((B, T, V), device=logits.device, dtype=logits.dtype)
    if N == 0:
        return dlogits
    bv, nw = _launch_cfg(V, block_v, num_warps, on_interpreter(logits))
    dummy = logp
    ref = ref_logits if (ref_logits is not None and mode == 4 and grad_kl is not None) else logits
    sr_b, sr_t = _row_strides(ref)
    with device_guard(logits):
        _logprobs_bwd_kernel[(N,)](
            logits, ref, targets, dlogits,
            grad_logp if grad_logp is not None else dummy,
            grad_kl if grad_kl is not None else dummy,
            grad_entropy if grad_entropy is not None else dummy,
            logp, ref_logp if ref_logp.numel() else dummy, kl_out if kl_out.numel() else dummy,
            entropy if entropy.numel() else dummy, stats,
            T, logits.stride(0), logits.stride(1), sr_b, sr_t, V, ignore_index,
            INV_T=1.0 / float(temperature), KL_MODE=mode,
            HAS_GLOGP=grad_logp is not None, HAS_GKL=grad_kl is not None, HAS_GENT=grad_entropy is not None,
            BLOCK_V=bv, num_warps=nw,
        )
    return dlogits
