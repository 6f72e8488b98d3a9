"""ops.linear_logprobs: the LM head fused with per-token log-probs, entropy and KL; logits never stored.

    linear_logprobs(hidden, weight, targets, temperature=1.0, kl=None, ignore_index=-100, *, bias=None,
                    backend=None) -> (logp, entropy, kl_or_None)

hidden: [S, *tok, D] (S streams of the same tokens, e.g. stream 0 = actor, stream 1 = reference), or
[*tok, D] (one stream, no stream dimension), or a list/tuple of S tensors [*tok, D]. Which form is meant is
read from targets: [*tok] integer (a leading stream dimension is there when hidden has two more dims than
targets). weight: [V, D], same dtype (float32, bfloat16, float16) and device as hidden; bias: [V] of that dtype
or None (a biased LM head, e.g. Phi's: the logits are h·Wᵀ + b, the bias added in fp32).
Returns float32: logp [S, *tok] = log softmax((h·Wᵀ + b) / temperature)[target], entropy [S, *tok] (of each stream's
distribution), and kl [*tok] = KL(π_0 ‖ π_1) between streams 0 and 1 when kl is "k1" | "k2" | "k3" (sampled-token
estimators, kernels/kl.py) or "full" (exact, summed over the vocabulary, same sweep), else None.
With a hidden of no stream dimension the stream dimension is dropped from logp/entropy too.
All outputs are 0 where target == ignore_index, and those tokens receive no gradient.
Semantics are reference.linear_logprobs (float64 ground truth).

Gradients: to every hidden stream that requires grad, to weight and to bias when they require grad (accumulated
in fp32, cast once; the bias's is the sum of dz over every token of every stream), for any combination of upstream gradients on logp, entropy and kl, token by token.
KL's gradient flows to stream 0 only: stream 1 is the reference policy and is treated as a constant in the
KL (a gradient on a stream-1 hidden comes from its own logp/entropy only). With kl="full" the backward
recomputes stream 1's logits next to stream 0's (one extra GEMM); use a sampled estimator or kl=None if the
KL is not in the loss. Pass the streams as a list (e.g. [h_actor, h_ref.detach()]) so the op knows which
streams need gradients; a single [S, ...] tensor that requires grad gets gradients for every stream.

The backward recomputes the logits tile by tile from hidden and weight with the saved per-row statistics
(log-sum-exp, entropy, KL), so nothing computed in the forward is rescaled:
    dz_v = p_v·(−c_lp − c_H·(log p_v + H) + [stream 0] c_K·(log p0_v − log p1_v − KL)) + c_lp·[v = target],
with c_lp, c_H, c_K the upstream gradients (c_lp of stream 0 also carries the sampled-KL derivative), and
dx = dz / temperature.

Backends: "torch" (vocabulary- and token-chunked PyTorch with an online log-sum-exp: exact fp32, peak extra
memory a few fp32 [S, tokens_chunk, vocab_chunk] temporaries) and "triton" (kernels/triton/linear_logprobs.py).
The triton backward runs the fused recompute kernel into a bounded dz chunk and then the two contractions as
cuBLAS GEMMs (torch.mm): with a frozen weight (PPO with LoRA) the chunk spans token rows × the whole vocabulary,
so dH = dz·W is one GEMM per chunk with fp32 accumulation over all of V and no cross-chunk sums; when the weight
needs a gradient the chunk spans all tokens × a vocabulary slice, so dW[slice] = dzᵀ·h is complete in one GEMM,
and dH accumulates in an fp32 buffer. Why not accumulate dH inside the kernel: a program's [BT, D] fp32 slice
of dH does not fit on chip at D=4096, and global read-modify-write or atomics per vocab tile cost T·D·V/BV
updates (tens of GB at 152k vocab); the staged dz costs ~6 bytes per logit of HBM traffic instead.

Registered with torch.library as hydra_kernels::linear_logprobs and hydra_kernels::linear_logprobs_backward, so
torch.compile(fullgraph=True) traces it. temperature stays a Python float inside the op and reaches the kernels
as a one-element fp32 tensor (never an fp64 scalar argument).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from hydra_kernels.kernels.kl import SAMPLED_KL_ESTIMATORS, sampled_kl, sampled_kl_grad
from hydra_kernels.ops._checks import (TARGET_DTYPES, check_ignore_index, check_kl, check_target_values,
                                       check_temperature, check_tensor)
from hydra_kernels.ops.backend import choose_backend, requested_backend
from hydra_kernels.ops.matmul import mm_f32

__all__ = ["linear_logprobs"]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tunables, read at run time (tests shrink them to force several chunks at tiny shapes).
# torch backend: fp32 elements of one [S, tokens_chunk, vocab_chunk] logits temporary.
TORCH_CHUNK_ELEMENTS = 1 << 22
# triton backward: the dz chunk buffer may take this fraction of the fp32 logits (S·T·V·4 bytes) ...
DZ_BUDGET_FRACTION = 0.04
# ... unless forced to this many tokens (frozen weight) or vocab columns (weight needs grad).
DZ_CHUNK_TOKENS: int | None = None
DZ_CHUNK_COLS: int | None = None
# With a frozen weight, which chunking the triton backward uses: "tokens" (token rows × all of V; dH = dz·W in
# one GEMM per chunk, M = chunk rows) or "vocab" (all tokens × a vocab slice; M = tokens, dH summed in fp32
# through torch.mm(out_dtype=float32)). A weight that needs a gradient always takes "vocab". Tune on the GPU.
DZ_LAYOUT = "tokens"
# triton forward: vocab splits (None = kernels' default for the device).
FWD_SPLITS: int | None = None


# ------------------------------------------------------------------------------------ shared math
def _combine(part: torch.Tensor, klpart: torch.Tensor | None):
    """Merge per-vocab-range partial statistics. part: [P, S, 4, T] = (m, l, b, tz) with
    l = Σe^{z−m}, b = Σe^{z−m}(z−m), tz = target logit (0 in the ranges that do not hold it);
    klpart: [P, T] = Σe^{z0−m0}((z0−m0) − (z1−m1)) or None.
    Returns lse, entropy, logp [S, T] and the full KL [T] (or None), unmasked."""
    m, l, b, tz = part.unbind(2)
    M = m.amax(0)
    dm = m - M                                       # ≤ 0; every range holds ≥ 1 real column: m finite
    w = torch.exp(dm)
    L = (w * l).sum(0)
    B = (w * (b + l * dm)).sum(0)
    log_l = torch.log(L)
    lse = M + log_l
    entropy = log_l - B / L
    logp = tz.sum(0) - lse
    kl_full = None
    if klpart is not None:
        A = (w[:, 0] * (klpart + l[:, 0] * (dm[:, 0] - dm[:, 1]))).sum(0)
        kl_full = A / L[0] - log_l[0] + log_l[1]
    return lse, entropy, logp, kl_full


def _finish(lse, entropy, logp, kl_full, targets, kl, ignore_index):
    """Mask ignored tokens; sampled KL from the two log-probs. Returns the op's four outputs."""
    valid = targets != ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=lse.device)
    logp = torch.where(valid, logp, zero)
    entropy = torch.where(valid, entropy, zero)
    if kl == "none":
        k = lse.new_zeros(0)
    else:
        k = kl_full if kl == "full" else sampled_kl(logp[1] - logp[0], kl)
        k = torch.where(valid, k, zero)
    return logp, entropy, k, lse


def _coefficients(g_logp, g_ent, g_kl, logp, entropy, klv, lse, targets, kl, ignore_index):
    """Per-row backward inputs: rowdata [S, 4, T] = (lse, entropy, c_lp, c_H) and klrow [2, T] = (KL, c_K)."""
    S, T = lse.shape
    valid = targets != ignore_index
    zero = torch.zeros((), dtype=torch.float32, device=lse.device)
    c_lp = g_logp.float() if g_logp is not None else lse.new_zeros(S, T)
    c_h = g_ent.float() if g_ent is not None else lse.new_zeros(S, T)
    klrow = None
    if kl in SAMPLED_KL_ESTIMATORS and g_kl is not None:
        # The reference's log-prob is a constant in the KL (no gradient to stream 1).
        dk = sampled_kl_grad(logp[1] - logp[0], kl)
        c_lp = torch.cat([(c_lp[0] + g_kl.float() * dk).unsqueeze(0), c_lp[1:]])
    elif kl == "full":
        g = g_kl.float() if g_kl is not None else lse.new_zeros(T)
        klrow = torch.stack([klv, torch.where(valid, g, zero)]).contiguous()
    c_lp = torch.where(valid, c_lp, zero)
    c_h = torch.where(valid, c_h, zero)
    rowdata = torch.stack([lse, entropy, c_lp, c_h], 1).contiguous()
    return rowdata, klrow


def _dz_streams(S, need_h, need_w, kl):
    """Streams whose dlogits are formed, and whether stream 0's carry the full-KL term (needs stream 1's z).
    need_w: a gradient of weight or bias is needed (both sum over every stream)."""
    streams = list(range(S)) if need_w else [s for s in range(S) if need_h[s]]
    return streams, (kl == "full" and 0 in streams)


def _chunks(n, size):
    for a in range(0, n, size):
        yield a, min(n, a + size)


# ----------------------------------------------------------------------------------------- torch backend
def _torch_chunk_sizes(S, T, V):
    budget = max(1, TORCH_CHUNK_ELEMENTS)
    cv = min(V, max(64, budget // max(1, S * T)))
    ct = min(T, max(1, budget // (S * cv)))
    return ct, cv


def _torch_forward(hidden, weight, bias, targets, temperature, kl, ignore_index):
    S = len(hidden)
    T = hidden[0].shape[0]
    V = weight.shape[0]
    inv_t = 1.0 / temperature
    h32 = [h.float() for h in hidden]
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    ct, cv = _torch_chunk_sizes(S, T, V)
    kl_full = kl == "full"
    outs = []
    for t0, t1 in _chunks(T, ct):
        tg = targets[t0:t1]
        parts, klparts = [], []
        for v0, v1 in _chunks(V, cv):
            wc = w32[v0:v1]
            z = torch.stack([h[t0:t1] @ wc.T for h in h32])                   # [S, t, c] fp32
            if b32 is not None:
                z.add_(b32[v0:v1])
            z.mul_(inv_t)
            m = z.amax(-1)
            in_chunk = (tg >= v0) & (tg < v1)
            idx = torch.where(in_chunk, tg - v0, torch.zeros_like(tg)).expand(S, -1).unsqueeze(-1)
            tz = torch.where(in_chunk, z.gather(-1, idx).squeeze(-1), torch.zeros((), device=z.device))
            zc = z.sub_(m.unsqueeze(-1))                                        # z − m, in place
            e = torch.exp(zc)
            l = e.sum(-1)
            if kl_full:
                klparts.append((e[0] * (zc[0] - zc[1])).sum(-1))
            b = e.mul_(zc).sum(-1)
            parts.append(torch.stack([m, l, b, tz], 1))
        part = torch.stack(parts)
        klpart = torch.stack(klparts) if kl_full else None
        outs.append(_combine(part, klpart))
    lse, entropy, logp = (torch.cat([o[i] for o in outs], -1) for i in range(3))
    kl_f = torch.cat([o[3] for o in outs]) if kl_full else None
    return _finish(lse, entropy, logp, kl_f, targets, kl, ignore_index)


def _torch_backward(rowdata, klrow, hidden, weight, bias, targets, temperature, kl, need_h, need_w, need_b):
    S = len(hidden)
    T, D = hidden[0].shape
    V = weight.shape[0]
    inv_t = 1.0 / temperature
    streams, kl_grad = _dz_streams(S, need_h, need_w or need_b, kl)
    compute = sorted(set(streams) | ({1} if kl_grad else set()))
    h32 = {s: hidden[s].float() for s in compute}
    w32 = weight.float()
    b32 = None if bias is None else bias.float()
    dH = {s: torch.zeros(T, D, dtype=torch.float32, device=weight.device) for s in range(S) if need_h[s]}
    dW = torch.zeros(V, D, dtype=torch.float32, device=weight.device) if need_w else None
    dB = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None
    ct, cv = _torch_chunk_sizes(len(compute), T, V)
    for t0, t1 in _chunks(T, ct):
        tg = targets[t0:t1]
        rd = rowdata[:, :, t0:t1]
        for v0, v1 in _chunks(V, cv):
            wc = w32[v0:v1]
            u = {}
            for s in compute:                                                   # log p
                z = h32[s][t0:t1] @ wc.T
                if b32 is not None:
                    z.add_(b32[v0:v1])
                u[s] = z.mul_(inv_t).sub_(rd[s, 0].unsqueeze(-1))
            in_chunk = (tg >= v0) & (tg < v1)
            idx = torch.where(in_chunk, tg - v0, torch.zeros_like(tg)).unsqueeze(-1)
            for s in streams:
                inner = -rd[s, 2].unsqueeze(-1) - rd[s, 3].unsqueeze(-1) * (u[s] + rd[s, 1].unsqueeze(-1))
                if s == 0 and kl_grad:
                    kr = klrow[:, t0:t1]
                    inner = inner + kr[1].unsqueeze(-1) * (u[0] - u[1] - kr[0].unsqueeze(-1))
                dz = torch.exp(u[s]).mul_(inner)
                dz.scatter_add_(-1, idx, torch.where(in_chunk, rd[s, 2], torch.zeros_like(rd[s, 2])).unsqueeze(-1))
                dz.mul_(inv_t)
                if s in dH:
                    dH[s][t0:t1] += dz @ wc
                if dW is not None:
                    dW[v0:v1] += dz.T @ h32[s][t0:t1]
                if dB is not None:
                    dB[v0:v1] += dz.sum(0)
    dh = [dH[s].to(hidden[s].dtype) for s in range(S) if need_h[s]]
    return dh, (dW.to(weight.dtype) if dW is not None else None), (dB.to(bias.dtype) if dB is not None else None)


# ---------------------------------------------------------------------------------------- triton backend
def _triton_forward(hidden, weight, bias, targets, temperature, kl, ignore_index):
    from hydra_kernels.kernels.triton.linear_logprobs import forward_partials
    part, klpart = forward_partials(hidden, weight, targets, temperature, kl == "full", FWD_SPLITS, bias=bias)
    lse, entropy, logp, kl_f = _combine(part, klpart)
    return _finish(lse, entropy, logp, kl_f, targets, kl, ignore_index)


def _pairs(streams, kl_grad):
    """Launch plan: (a, b, kl_grad, write_b) — pairs of streams share the W tile in one dz launch."""
    rest = list(streams)
    plan = []
    if kl_grad:
        write_b = 1 in rest
        plan.append((0, 1, True, write_b))
        rest = [s for s in rest if s != 0 and not (write_b and s == 1)]
    while rest:
        a = rest.pop(0)
        b = rest.pop(0) if rest else None
        plan.append((a, b, False, b is not None))
    return plan


def _triton_backward(rowdata, klrow, hidden, weight, bias, targets, temperature, kl, need_h, need_w, need_b):
    from hydra_kernels.kernels.triton.linear_logprobs import dz_chunk
    S = len(hidden)
    T, D = hidden[0].shape
    V = weight.shape[0]
    dtype = hidden[0].dtype
    elt = hidden[0].element_size()
    streams, kl_grad = _dz_streams(S, need_h, need_w or need_b, kl)
    plan = _pairs(streams, kl_grad)
    slot = {s: i for i, s in enumerate(streams)}
    budget = DZ_BUDGET_FRACTION * S * T * V * 4
    dH = {s: torch.empty(T, D, dtype=dtype, device=weight.device) for s in range(S) if need_h[s]}
    dW = None
    # The bias's gradient Σ dz over every token of every stream, summed in fp32 from the staged dz chunks.
    dB = torch.zeros(V, dtype=torch.float32, device=weight.device) if need_b else None

    def launch(bufs, t_begin, v_begin):
        for a, b, klg, wb in plan:
            dz_chunk(hidden, weight, targets, temperature, rowdata, klrow, (a, b), klg, wb,
                     bufs[slot[a]], bufs[slot[b]] if wb else None, t_begin, v_begin, bias=bias)

    n_g = len(streams)
    if not need_w and DZ_LAYOUT == "tokens":
        # Token chunks × the whole vocabulary: dH rows = dz·W in one GEMM, fp32-accumulated over all of V.
        ct = DZ_CHUNK_TOKENS or max(64, int(budget // (n_g * V * elt)) // 64 * 64)
        ct = min(T, ct)
        buf = torch.empty(n_g, ct, V, dtype=dtype, device=weight.device)
        for t0, t1 in _chunks(T, ct):
            n = t1 - t0
            bufs = [buf[i, :n] for i in range(n_g)]
            launch(bufs, t0, 0)
            for s in dH:
                torch.mm(bufs[slot[s]], weight, out=dH[s][t0:t1])
            if dB is not None:
                dB += buf[:, :n].sum((0, 1), dtype=torch.float32)
    else:
        # All tokens × a vocabulary slice: dW[slice] = dzᵀ·h in one GEMM over every token of every stream
        # (fp32 accumulation inside, one rounding); dH sums the slices in fp32.
        cv = DZ_CHUNK_COLS or max(256, int(budget // (n_g * T * elt)) // 256 * 256)
        cv = min(V, cv)
        flat = torch.empty(n_g * T * cv, dtype=dtype, device=weight.device)
        if need_w:
            dW = torch.empty_like(weight)
            h_cat = torch.cat(hidden) if S > 1 else hidden[0]        # streams == all S when need_w
        acc = {s: torch.zeros(T, D, dtype=torch.float32, device=weight.device) for s in dH}
        for v0, v1 in _chunks(V, cv):
            n = v1 - v0
            dz = flat[:n_g * T * n].view(n_g, T, n)
            launch([dz[i] for i in range(n_g)], 0, v0)
            if need_w:
                torch.mm(dz.view(n_g * T, n).T, h_cat, out=dW[v0:v1])
            if dB is not None:
                dB[v0:v1] = dz.sum((0, 1), dtype=torch.float32)
            for s in acc:
                acc[s] += mm_f32(dz[slot[s]], weight[v0:v1])
        for s in acc:
            dH[s].copy_(acc[s])
    return [dH[s] for s in range(S) if need_h[s]], dW, (dB.to(bias.dtype) if dB is not None else None)


# ------------------------------------------------------------------------------------ backend dispatch
def _forward_impl(backend):
    if backend == "torch":
        return _torch_forward
    if backend == "triton":
        return _triton_forward
    raise ValueError(f"backend: unknown backend {backend!r}")


def _backward_impl(backend):
    if backend == "torch":
        return _torch_backward
    if backend == "triton":
        return _triton_backward
    raise ValueError(f"backend: unknown backend {backend!r}")


# ------------------------------------------------------------------------------- torch.library ops
@torch.library.custom_op("hydra_kernels::linear_logprobs", mutates_args=())
def _linear_logprobs_op(hidden: List[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                        targets: torch.Tensor, temperature: float, kl: str, ignore_index: int, backend: str
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns logp [S, T], entropy [S, T], kl [T] ([0] when kl == "none"), lse [S, T] (for the backward)."""
    S, (T, _) = len(hidden), hidden[0].shape
    check_target_values(targets, weight.shape[0], ignore_index)
    if T == 0:
        z = weight.new_zeros(S, 0, dtype=torch.float32)
        return z, z.clone(), weight.new_zeros(0, dtype=torch.float32), z.clone()
    return _forward_impl(backend)(list(hidden), weight, bias, targets, temperature, kl, ignore_index)


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, targets, temperature, kl, ignore_index, backend):
    S, T = len(hidden), hidden[0].shape[0]
    f = dict(dtype=torch.float32)
    return (weight.new_empty(S, T, **f), weight.new_empty(S, T, **f),
            weight.new_empty(0 if kl == "none" else T, **f), weight.new_empty(S, T, **f))


@torch.library.custom_op("hydra_kernels::linear_logprobs_backward", mutates_args=())
def _linear_logprobs_backward_op(g_logp: torch.Tensor, g_entropy: torch.Tensor, g_kl: torch.Tensor,
                                 hidden: List[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor],
                                 targets: torch.Tensor, logp: torch.Tensor, entropy: torch.Tensor,
                                 klv: torch.Tensor, lse: torch.Tensor, temperature: float, kl: str,
                                 ignore_index: int, need_hidden: List[bool], need_weight: bool, need_bias: bool,
                                 backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dH [n, T, D] for the n streams with need_hidden (in order), dW [V, D] and dB [V] ([0] where not
    needed)."""
    hidden = list(hidden)
    T, D = hidden[0].shape
    n = sum(bool(x) for x in need_hidden)
    need_bias = bool(need_bias) and bias is not None
    if T == 0:
        dw = torch.zeros_like(weight) if need_weight else weight.new_empty(0)
        db = torch.zeros_like(bias) if need_bias else weight.new_empty(0)
        return hidden[0].new_zeros(n, 0, D), dw, db
    rowdata, klrow = _coefficients(g_logp, g_entropy, g_kl if kl != "none" else None, logp, entropy, klv, lse,
                                   targets, kl, ignore_index)
    dh, dw, db = _backward_impl(backend)(rowdata, klrow, hidden, weight, bias, targets, temperature, kl,
                                         [bool(x) for x in need_hidden], bool(need_weight), need_bias)
    dh = torch.stack(dh) if dh else hidden[0].new_empty(0, T, D)
    return dh, (dw if dw is not None else weight.new_empty(0)), (db if db is not None else weight.new_empty(0))


@_linear_logprobs_backward_op.register_fake
def _(g_logp, g_entropy, g_kl, hidden, weight, bias, targets, logp, entropy, klv, lse, temperature, kl,
      ignore_index, need_hidden, need_weight, need_bias, backend):
    T, D = hidden[0].shape
    n = sum(bool(x) for x in need_hidden)
    db = bias.new_empty(bias.shape) if (need_bias and bias is not None) else weight.new_empty(0)
    return (hidden[0].new_empty(n, T, D), (weight.new_empty(weight.shape) if need_weight else weight.new_empty(0)),
            db)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, kl, ignore_index, backend = inputs
    logp, entropy, klv, lse = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(*hidden, weight, targets, logp, entropy, klv, lse, *([bias] if ctx.has_bias else []))
    ctx.n_streams = len(hidden)
    ctx.temperature, ctx.kl, ctx.ignore_index, ctx.backend = temperature, kl, ignore_index, backend


def _needs(ctx):
    """(need_hidden per stream, need_weight, need_bias)."""
    flags = ctx.needs_input_grad
    S = ctx.n_streams
    if isinstance(flags[0], (list, tuple)):          # list inputs come back unflattened (torch ≥ 2.4)
        return [bool(f) for f in flags[0]], bool(flags[1]), bool(flags[2])
    return [bool(f) for f in flags[:S]], bool(flags[S]), bool(flags[S + 1])


def _backward(ctx, g_logp, g_entropy, g_kl, _g_lse):
    saved = ctx.saved_tensors
    S = ctx.n_streams
    hidden, (weight, targets, logp, entropy, klv, lse) = list(saved[:S]), saved[S:S + 6]
    bias = saved[S + 6] if ctx.has_bias else None
    need_h, need_w, need_b = _needs(ctx)
    need_b = need_b and bias is not None
    grads_h = [None] * S
    if not (any(need_h) or need_w or need_b):
        return grads_h, None, None, None, None, None, None, None
    zeros = lse.new_zeros
    g_logp = g_logp if g_logp is not None else zeros(lse.shape)
    g_entropy = g_entropy if g_entropy is not None else zeros(lse.shape)
    g_kl = g_kl if g_kl is not None else zeros(klv.shape)
    dh, dw, db = _linear_logprobs_backward_op(g_logp.contiguous(), g_entropy.contiguous(), g_kl.contiguous(),
                                              hidden, weight, bias, targets, logp, entropy, klv, lse,
                                              ctx.temperature, ctx.kl, ctx.ignore_index, need_h, need_w, need_b,
                                              ctx.backend)
    i = 0
    for s in range(S):
        if need_h[s]:
            grads_h[s] = dh[i]
            i += 1
    return grads_h, (dw if need_w else None), (db if need_b else None), None, None, None, None, None


_linear_logprobs_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------- public op
def linear_logprobs(hidden: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0, kl: str | None = None, ignore_index: int = -100, *,
                    bias: torch.Tensor | None = None, backend: str | None = None):
    """LM head + per-token log-probs, entropy and KL in one sweep over `weight`; see the module docstring.

    hidden: [S, *tok, D], [*tok, D] (S = 1) or a list of S tensors [*tok, D]; weight: [V, D]; targets: [*tok];
    bias: [V] (same dtype and device as weight) or None.
    kl: None, "k1", "k2", "k3" or "full" (between stream 0 = policy and stream 1 = reference; needs S ≥ 2).
    backend: "torch", "triton" or None (HYDRA_KERNELS_BACKEND, else automatic).
    Returns (logp [S, *tok] fp32, entropy [S, *tok] fp32, kl [*tok] fp32 or None).
    """
    check_tensor("targets", targets, dtypes=TARGET_DTYPES)
    tok = tuple(targets.shape)
    squeeze = False
    if isinstance(hidden, (list, tuple)):
        if len(hidden) == 0:
            raise ValueError("hidden: needs at least one stream")
        streams = list(hidden)
        for i, h in enumerate(streams):
            check_tensor(f"hidden[{i}]" if i else "hidden", h, dtypes=DTYPES)
            if h.shape != streams[0].shape or h.dtype != streams[0].dtype or h.device != streams[0].device:
                raise ValueError(f"hidden: stream {i} has shape {tuple(h.shape)}, {h.dtype}, {h.device}; "
                                 f"expected those of stream 0 {tuple(streams[0].shape)}, {streams[0].dtype}, "
                                 f"{streams[0].device}")
        lead = streams[0].shape[:-1]
    else:
        check_tensor("hidden", hidden, dtypes=DTYPES)
        if hidden.dim() == len(tok) + 1:
            squeeze = True
            streams = [hidden]
            lead = hidden.shape[:-1]
        elif hidden.dim() == len(tok) + 2:
            streams = list(hidden.unbind(0))
            lead = hidden.shape[1:-1]
        else:
            raise ValueError(f"hidden: shape {tuple(hidden.shape)} does not fit targets {tok} "
                             "(expected [S, *targets.shape, D] or [*targets.shape, D])")
    if tuple(lead) != tok:
        raise ValueError(f"targets: shape {tok} does not match hidden's token dimensions {tuple(lead)}")
    h0 = streams[0]
    D = h0.shape[-1]
    if D == 0:
        raise ValueError(f"hidden: shape {tuple(h0.shape)} has hidden size D = 0")
    check_tensor("weight", weight, ndim=2, dtypes=(h0.dtype,), device=h0.device)
    if weight.shape[1] != D:
        raise ValueError(f"weight: shape {tuple(weight.shape)} has D={weight.shape[1]}, hidden has D={D}")
    if weight.shape[0] == 0:
        raise ValueError("weight: empty vocabulary")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(h0.dtype,), device=h0.device)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias: shape {tuple(bias.shape)} does not match weight's vocabulary {weight.shape[0]}")
        bias = bias.contiguous()
    check_tensor("targets", targets, device=h0.device)
    S = len(streams)
    check_kl(kl, allow_none=True)
    if kl is not None and S < 2:
        raise ValueError("kl: needs at least two streams (stream 0 = policy, stream 1 = reference)")
    temperature = check_temperature(temperature)
    check_ignore_index(ignore_index)
    if backend is None and requested_backend(None) == "cuda":
        backend = "auto"     # a process-wide "cuda" preference: this op has no CUDA kernel, use the default
    chosen = choose_backend(backend, h0.device, available=("torch", "triton"))

    flat = [h.reshape(-1, D) for h in streams]
    flat = [h if h.stride() == (D, 1) else h.contiguous() for h in flat]
    tg = targets.reshape(-1)
    tg = (tg if tg.dtype == torch.int64 else tg.long()).contiguous()
    logp, entropy, k, _ = _linear_logprobs_op(flat, weight.contiguous(), bias, tg, temperature,
                                              "none" if kl is None else kl, int(ignore_index), chosen)
    if squeeze:
        logp, entropy = logp.reshape(tok), entropy.reshape(tok)
    else:
        logp, entropy = logp.reshape(S, *tok), entropy.reshape(S, *tok)
    return logp, entropy, (k.reshape(tok) if kl is not None else None)
