"""ops.token_logprobs and ops.logprobs_and_kl: per-token log-probs, KL and entropy from stored logits.

    token_logprobs(logits, targets, temperature=1.0, ignore_index=-100)            -> logp
    logprobs_and_kl(logits, ref_logits, targets, temperature=1.0, kl="k3",
                    ignore_index=-100)                                            -> (logp, ref_logp, kl, entropy)

logits / ref_logits: [..., V] float32, bfloat16 or float16 (float64 on the torch backend), same shape, dtype and
device; the last dimension must have stride 1 or it is copied once (other dims may be strided: a
`logits[:, :-1]` slice is read in place). targets: [...] integer, logits.shape[:-1]. Outputs are float32,
shaped like targets, and 0 wherever target == ignore_index. kl: "k1" | "k2" | "k3" (sampled-token estimators of
KL(pi || pi_ref), see kernels/kl.py) or "full" (exact KL over the whole vocabulary). entropy is the
actor's. Semantics are those of `hydra_kernels.reference` (the float64 ground truth).

Targets outside [0, V) that are not ignore_index raise ValueError in eager mode (one small reduction and a
host sync per call); under torch.compile (and under dispatch modes such as FakeTensorMode or make_fx) that
data-dependent check is skipped and such rows come out NaN.

Gradients flow to `logits` only, for any combination of upstream gradients on (logp, kl, entropy). The
reference side is frozen: ref_logits never receives a gradient (even if it requires one), and a gradient on
the returned ref_logp is dropped. The backward recomputes softmax from the logits and the saved per-row
statistics (row max and log-sum of exp), so a different upstream weight on every token is exact.

Backends: "torch" (row-chunked PyTorch, bounded memory: never more than a few [chunk, V] fp32 temporaries),
"triton" (kernels/triton/logprobs.py, one pass over both logit tensors), "cuda" (kernels/cuda.py, same
launcher contract; used only when requested explicitly). Registered with torch.library as
hydra_kernels::logprobs_and_kl and hydra_kernels::logprobs_and_kl_backward so torch.compile(fullgraph=True)
traces them; temperature stays a Python float inside the op and reaches the kernels as a compile-time constant.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from hydra_kernels.kernels.kl import SAMPLED_KL_ESTIMATORS, sampled_kl, sampled_kl_grad
from hydra_kernels.ops._checks import (FLOAT_DTYPES, TARGET_DTYPES, check_ignore_index, check_kl, check_target_values,
                                       check_temperature, check_tensor)
from hydra_kernels.ops.backend import choose_backend

__all__ = ["token_logprobs", "logprobs_and_kl"]

_GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Elements of one fp32 [rows, V] temporary in the torch backend (16 MiB): bounds its memory at any size.
_TORCH_CHUNK_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------------------- torch backend
def _row_chunks(x3: torch.Tensor, rows: int):
    """Yield (first_row, last_row, [n, V] chunk) over a [B, T, V] tensor without copying all of it."""
    B, T, V = x3.shape
    if T >= rows:
        for b in range(B):
            for t0 in range(0, T, rows):
                t1 = min(T, t0 + rows)
                yield b * T + t0, b * T + t1, x3[b, t0:t1]
    else:
        per = max(1, rows // max(T, 1))
        for b0 in range(0, B, per):
            b1 = min(B, b0 + per)
            # reshape copies only this chunk when B and T do not merge into one stride.
            yield b0 * T, b1 * T, x3[b0:b1].reshape(-1, V)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _shifted(x: torch.Tensor, temperature: float, dtype: torch.dtype):
    """z = x / T, its row max m (0 where the row is all -inf), z - m, e^(z-m) and the finite mask."""
    z = x.to(dtype)
    if temperature != 1.0:
        z = z / temperature
    m = z.amax(-1)
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    zs = z - m.unsqueeze(-1)
    live = z != float("-inf")
    return m, zs, live


def _torch_forward(logits, ref_logits, targets, temperature, kl, ignore_index):
    """Same contract as kernels/triton/logprobs.py `logprobs_and_kl_forward` (stats included)."""
    B, T, V = logits.shape
    N = B * T
    dev, f32 = logits.device, torch.float32
    has_ref = ref_logits is not None
    n_ref = N if has_ref else 0
    logp = torch.zeros(N, device=dev, dtype=f32)
    ref_logp, kl_out, entropy = (torch.zeros(n_ref, device=dev, dtype=f32) for _ in range(3))
    stats = torch.zeros(N, 4, device=dev, dtype=f32)
    cdt = _compute_dtype(logits)
    rows = max(1, _TORCH_CHUNK_ELEMENTS // V)
    ref_chunks = _row_chunks(ref_logits, rows) if has_ref else None
    for r0, r1, x in _row_chunks(logits, rows):
        xr = next(ref_chunks)[2] if has_ref else None
        tg = targets[r0:r1]
        valid = tg != ignore_index
        in_range = (tg >= 0) & (tg < V)
        safe = torch.where(in_range, tg, torch.zeros_like(tg)).unsqueeze(-1)
        nan = torch.full_like(tg, float("nan"), dtype=cdt)

        m, zs, live = _shifted(x, temperature, cdt)
        e = torch.exp(zs)
        s = e.sum(-1)
        log_s = torch.log(s)
        lp = torch.where(in_range, zs.gather(-1, safe).squeeze(-1) - log_s, nan)
        logp[r0:r1] = torch.where(valid, lp, torch.zeros_like(lp))
        stats[r0:r1, 0] = torch.where(valid, m, torch.zeros_like(m))
        stats[r0:r1, 1] = torch.where(valid, log_s, torch.zeros_like(log_s))
        if not has_ref:
            continue
        zero = torch.zeros_like(lp)
        # Max-shifted accumulation (as in the kernel): entropy = log s - sum e (z-m) / s.
        a = torch.where(live, e * zs, torch.zeros_like(e)).sum(-1)
        ent = log_s - a / s
        mr, zrs, _ = _shifted(xr, temperature, cdt)
        log_sr = torch.log(torch.exp(zrs).sum(-1))
        rlp = torch.where(in_range, zrs.gather(-1, safe).squeeze(-1) - log_sr, nan)
        if kl == "full":
            c = torch.where(live, e * (zs - zrs), torch.zeros_like(e)).sum(-1)
            k = c / s - log_s + log_sr
        else:
            # Regrouped as in the kernel so that huge logits cancel before rounding.
            zt, zrt = (y.gather(-1, safe).squeeze(-1).to(cdt) for y in (x, xr))
            if temperature != 1.0:
                zt, zrt = zt / temperature, zrt / temperature
            d = torch.where(in_range, ((zrt - zt) + (m - mr)) + (log_s - log_sr), nan)
            k = sampled_kl(d, kl)
        ref_logp[r0:r1] = torch.where(valid, rlp, zero)
        kl_out[r0:r1] = torch.where(valid, k, zero)
        entropy[r0:r1] = torch.where(valid, ent, zero)
        stats[r0:r1, 2] = torch.where(valid, mr, torch.zeros_like(mr))
        stats[r0:r1, 3] = torch.where(valid, log_sr, torch.zeros_like(log_sr))
    return logp, ref_logp, kl_out, entropy, stats


def _torch_backward(grad_logp, grad_kl, grad_entropy, logits, ref_logits, targets, logp, ref_logp, kl_out,
                    entropy, stats, temperature, kl, ignore_index):
    """Same contract as kernels/triton/logprobs.py `logprobs_and_kl_backward`."""
    B, T, V = logits.shape
    N = B * T
    dlogits = torch.empty(B, T, V, device=logits.device, dtype=logits.dtype)
    dflat = dlogits.view(N, V)
    cdt = _compute_dtype(logits)
    if kl == "none":
        grad_kl = grad_entropy = None
    zeros = torch.zeros(N, device=logits.device, dtype=cdt)
    valid = targets != ignore_index
    # Per-row coefficients (the same algebra as the Triton kernel's).
    g = grad_logp.to(cdt) if grad_logp is not None else zeros
    if grad_kl is not None and kl in SAMPLED_KL_ESTIMATORS:
        gk, lp, rlp = grad_kl.to(cdt), logp.to(cdt), ref_logp.to(cdt)
        g = g + gk * sampled_kl_grad(rlp - lp, kl)
    g = torch.where(valid, g, zeros)
    gh = torch.where(valid, grad_entropy.to(cdt), zeros) if grad_entropy is not None else zeros
    h = entropy.to(cdt) if grad_entropy is not None else zeros
    need_ref = kl == "full" and grad_kl is not None
    gf = torch.where(valid, grad_kl.to(cdt), zeros) if need_ref else zeros
    kf = kl_out.to(cdt) if need_ref else zeros
    coef0 = -g - gh * h - gf * kf
    st = stats.to(cdt)

    rows = max(1, _TORCH_CHUNK_ELEMENTS // V)
    ref_chunks = _row_chunks(ref_logits, rows) if need_ref else None
    for r0, r1, x in _row_chunks(logits, rows):
        xr = next(ref_chunks)[2] if need_ref else None
        z = x.to(cdt)
        if temperature != 1.0:
            z = z / temperature
        live = z != float("-inf")
        lp = torch.where(live, (z - st[r0:r1, 0:1]) - st[r0:r1, 1:2], torch.zeros_like(z))
        p = torch.where(live, torch.exp(lp), torch.zeros_like(z))
        inner = coef0[r0:r1, None] - gh[r0:r1, None] * lp
        if need_ref:
            zr = xr.to(cdt)
            if temperature != 1.0:
                zr = zr / temperature
            lq = (zr - st[r0:r1, 2:3]) - st[r0:r1, 3:4]
            inner = inner + gf[r0:r1, None] * (lp - lq)
        dz = torch.where(live, p * inner, torch.zeros_like(inner))   # p = 0 there; inner may be infinite
        tg = targets[r0:r1]
        vr = valid[r0:r1]
        in_range = (tg >= 0) & (tg < V)
        safe = torch.where(in_range, tg, torch.zeros_like(tg)).unsqueeze(-1)
        dz.scatter_add_(-1, safe, torch.where(in_range, g[r0:r1], torch.zeros_like(g[r0:r1])).unsqueeze(-1))
        # Ignored rows are exactly zero (their p was computed against zeroed stats and means nothing).
        dz = torch.where(vr.unsqueeze(-1), dz, torch.zeros_like(dz))
        if temperature != 1.0:
            dz = dz / temperature
        dflat[r0:r1] = dz.to(logits.dtype)
    return dlogits


# ------------------------------------------------------------------------------------ backend dispatch
def _forward_impl(backend):
    if backend == "torch":
        return _torch_forward
    if backend == "triton":
        from hydra_kernels.kernels.triton.logprobs import logprobs_and_kl_forward
        return logprobs_and_kl_forward
    if backend == "cuda":
        return _cuda_fn("logprobs_and_kl_forward")
    raise ValueError(f"backend: unknown backend {backend!r}")


def _backward_impl(backend):
    if backend == "torch":
        return _torch_backward
    if backend == "cuda":
        return _cuda_fn("logprobs_and_kl_backward")
    from hydra_kernels.kernels.triton.logprobs import logprobs_and_kl_backward
    return logprobs_and_kl_backward


def _cuda_fn(name):
    try:
        from hydra_kernels.kernels import cuda as _cuda
        return getattr(_cuda, name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"backend: 'cuda' has no {name} ({exc}); use backend='triton'") from exc


def _fix_last_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Kernels need unit stride along the vocabulary; compile may hand us other layouts.
    if t is not None and t.stride(-1) != 1:
        t = t.contiguous()
    return t


# ------------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("hydra_kernels::logprobs_and_kl", mutates_args=())
def _logprobs_op(logits: torch.Tensor, ref_logits: Optional[torch.Tensor], targets: torch.Tensor,
                 temperature: float, kl: str, ignore_index: int,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_impl(backend)(_fix_last_stride(logits), _fix_last_stride(ref_logits), targets.contiguous(),
                                  float(temperature), kl, int(ignore_index))


@_logprobs_op.register_fake
def _(logits, ref_logits, targets, temperature, kl, ignore_index, backend):
    n = targets.shape[0]
    n_ref = n if ref_logits is not None else 0
    f = dict(dtype=torch.float32)
    return (logits.new_empty(n, **f), logits.new_empty(n_ref, **f), logits.new_empty(n_ref, **f),
            logits.new_empty(n_ref, **f), logits.new_empty(n, 4, **f))


@torch.library.custom_op("hydra_kernels::logprobs_and_kl_backward", mutates_args=())
def _logprobs_backward_op(grad_logp: Optional[torch.Tensor], grad_kl: Optional[torch.Tensor],
                          grad_entropy: Optional[torch.Tensor], logits: torch.Tensor,
                          ref_logits: Optional[torch.Tensor], targets: torch.Tensor, logp: torch.Tensor,
                          ref_logp: torch.Tensor, kl_out: torch.Tensor, entropy: torch.Tensor,
                          stats: torch.Tensor, temperature: float, kl: str, ignore_index: int,
                          backend: str) -> torch.Tensor:
    # Upstream gradients may arrive expanded (stride 0, e.g. from .sum()) or in another dtype.
    def prep(g):
        return None if g is None else g.to(torch.float32).contiguous()

    return _backward_impl(backend)(prep(grad_logp), prep(grad_kl), prep(grad_entropy),
                                   _fix_last_stride(logits), _fix_last_stride(ref_logits), targets.contiguous(),
                                   logp, ref_logp, kl_out, entropy, stats, float(temperature), kl,
                                   int(ignore_index))


@_logprobs_backward_op.register_fake
def _(grad_logp, grad_kl, grad_entropy, logits, ref_logits, targets, logp, ref_logp, kl_out, entropy, stats,
      temperature, kl, ignore_index, backend):
    return logits.new_empty(logits.shape)


def _setup_context(ctx, inputs, output):
    logits, ref_logits, targets, temperature, kl, ignore_index, backend = inputs
    logp, ref_logp, kl_out, entropy, stats = output
    # Undefined upstream gradients stay None, so the backward skips work (and the reference logits) for
    # outputs that no loss uses.
    ctx.set_materialize_grads(False)
    # The reference logits are needed again only for the full-KL gradient; otherwise don't keep them alive.
    keep_ref = ref_logits if kl == "full" else None
    ctx.save_for_backward(logits, keep_ref, targets, logp, ref_logp, kl_out, entropy, stats)
    ctx.temperature, ctx.kl, ctx.ignore_index, ctx.backend = temperature, kl, ignore_index, backend


def _backward(ctx, g_logp, _g_ref_logp, g_kl, g_entropy, _g_stats):
    logits, ref_logits, targets, logp, ref_logp, kl_out, entropy, stats = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (g_logp is None and g_kl is None and g_entropy is None):
        return None, None, None, None, None, None, None
    dlogits = _logprobs_backward_op(g_logp, g_kl, g_entropy, logits, ref_logits, targets, logp, ref_logp,
                                    kl_out, entropy, stats, ctx.temperature, ctx.kl, ctx.ignore_index,
                                    ctx.backend)
    return dlogits, None, None, None, None, None, None


_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------- public ops
def _foldable(sizes, strides) -> bool:
    """True when these dims fold into one strided dim (a view, no copy)."""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    return all(dims[i][1] == dims[i + 1][1] * dims[i + 1][0] for i in range(len(dims) - 1))


def _fits(x: torch.Tensor, k: int) -> bool:
    """Leading dims [:k] fold into B and [k:-1] into T, and the vocabulary has unit stride."""
    lead = x.dim() - 1
    return (x.stride(-1) == 1 and _foldable(x.shape[:k], x.stride()[:k])
            and _foldable(x.shape[k:lead], x.stride()[k:lead]))


def _as_3d(logits: torch.Tensor, ref_logits: Optional[torch.Tensor]):
    """[..., V] -> [B, T, V] views sharing one (B, T) split, so a `logits[:, :-1]` slice is read in place.

    Rows are r = b*T + t for both tensors. A tensor that fits no common split is copied once.
    """
    lead = logits.dim() - 1
    both = [k for k in range(max(lead, 1)) if _fits(logits, k) and (ref_logits is None or _fits(ref_logits, k))]
    own = [k for k in range(max(lead, 1)) if _fits(logits, k)]
    k = both[0] if both else (own[0] if own else 0)

    def fold(x):
        if x is None:
            return None
        if not _fits(x, k):
            x = x.contiguous()
        return x.reshape(math.prod(x.shape[:k]), math.prod(x.shape[k:lead]), x.shape[-1])

    return fold(logits), fold(ref_logits)


def _check_inputs(logits, ref_logits, targets, temperature, kl, ignore_index, backend):
    check_tensor("logits", logits, dtypes=FLOAT_DTYPES)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits: expected shape [..., V] with V >= 1, got {tuple(logits.shape)}")
    check_tensor("targets", targets, dtypes=TARGET_DTYPES, device=logits.device)
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets: shape {tuple(targets.shape)} must equal logits.shape[:-1] "
                         f"{tuple(logits.shape[:-1])}")
    if ref_logits is not None:
        check_tensor("ref_logits", ref_logits, dtypes=(logits.dtype,), device=logits.device)
        if tuple(ref_logits.shape) != tuple(logits.shape):
            raise ValueError(f"ref_logits: shape {tuple(ref_logits.shape)} must equal logits' "
                             f"{tuple(logits.shape)}")
    check_kl(kl, allow_none=ref_logits is None)
    temperature = check_temperature(temperature)
    check_ignore_index(ignore_index)
    chosen = choose_backend(backend, logits.device, gpu_default="triton")
    if chosen in ("triton", "cuda") and logits.dtype not in _GPU_DTYPES:
        raise ValueError(f"logits: dtype {logits.dtype} is supported by the torch backend only "
                         f"(GPU kernels take {list(_GPU_DTYPES)})")
    check_target_values(targets, logits.shape[-1], ignore_index)
    return temperature, chosen


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   ignore_index: int = -100, *, backend: str | None = None) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per token, float32, shaped like targets (0 where ignored).

    backend: "torch", "triton", "cuda" or None (HYDRA_KERNELS_BACKEND, else automatic).
    """
    temperature, chosen = _check_inputs(logits, None, targets, temperature, None, ignore_index, backend)
    x3, _ = _as_3d(logits, None)
    logp, _, _, _, _ = _logprobs_op(x3, None, targets.reshape(-1).to(torch.int64), temperature, "none",
                                    ignore_index, chosen)
    return logp.view(targets.shape)


def logprobs_and_kl(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0, kl: str = "k3", ignore_index: int = -100, *,
                    backend: str | None = None):
    """(actor log-prob, reference log-prob, per-token KL, actor entropy), float32, each shaped like targets.

    One pass over both logit tensors. Gradient flows to `logits` only (see the module docstring).
    kl: "k1" | "k2" | "k3" | "full". backend: "torch", "triton", "cuda" or None.
    """
    if ref_logits is None:
        raise ValueError("ref_logits: required (use token_logprobs for the actor alone)")
    temperature, chosen = _check_inputs(logits, ref_logits, targets, temperature, kl, ignore_index, backend)
    # The reference is frozen: detach so autograd never routes anything to it.
    x3, r3 = _as_3d(logits, ref_logits.detach())
    outs = _logprobs_op(x3, r3, targets.reshape(-1).to(torch.int64),
                        temperature, kl, ignore_index, chosen)
    shape = targets.shape
    return tuple(t.view(shape) for t in outs[:4])
