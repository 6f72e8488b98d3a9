"""GPU parity of the csrc/ CUDA kernels with reference.py (float64) and with the Triton kernels.

Every test is marked gpu (skipped without a CUDA device). Inputs are fresh random values (never zeros) rounded to
the dtype under test; the float64 reference runs on exactly those rounded values. Outputs the launchers allocate
are poisoned through the caching allocator (a NaN-filled block is freed right before each call), so an element a
kernel forgets to write shows up as NaN.

Run on a GPU machine:  python -m pytest tests/kernels/test_cuda_parity.py -v -m gpu
(the first test JIT-compiles csrc/ into ~/.cache/hydra_kernels, about a minute).
"""
from __future__ import annotations

import pytest
import torch

from hydra_kernels import reference
from tests._util import REL_TOL, assert_rel_close, rel_err

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# log-probs are computed in fp32 from the dtype's values: compare at fp32 accuracy whatever the input dtype
# (x10: sums over 152k terms, one approximate exp2 per term).
LOGPROB_TOL = 10 * REL_TOL[torch.float32]


def _ck():
    from hydra_kernels.kernels import cuda as ck
    reason = ck.unavailable_reason()
    if reason is not None:
        pytest.fail(f"CUDA extension unavailable on a GPU machine: {reason}")
    return ck


def _triton():
    try:
        from hydra_kernels.kernels.triton import logprobs as tl_lp
        from hydra_kernels.kernels.triton import lora_linear as tl_lora
    except Exception as e:  # pragma: no cover - reported, not hidden
        pytest.skip(f"Triton kernels not importable: {e}")
    return tl_lp, tl_lora


def _poison_allocator(nbytes: int) -> None:
    """Leave a NaN-filled block in the caching allocator: outputs allocated next likely reuse it."""
    torch.empty(nbytes // 4 + 1024, dtype=torch.float32, device="cuda").fill_(float("nan"))


# ============================================================================================ log-probs
def _logits(B, T, V, dtype, *, scale=3.0, slice_last=False, neg_inf_cols=(), gen=None):
    """[B, T, V] logits in `dtype`; slice_last gives a `x[:, :-1]` view (strided rows, unaligned starts for odd
    V); neg_inf_cols are masked with -inf in every row."""
    full = torch.randn(B, T + (1 if slice_last else 0), V, device="cuda", generator=gen) * scale
    full[..., list(neg_inf_cols)] = float("-inf")
    full = full.to(dtype)
    return full[:, :-1] if slice_last else full


def _targets(B, T, V, *, ignore_index=-100, frac_ignored=0.2, gen=None):
    t = torch.randint(0, V, (B, T), device="cuda", generator=gen)
    ign = torch.rand(B, T, device="cuda", generator=gen) < frac_ignored
    return torch.where(ign, torch.full_like(t, ignore_index), t)


def _ref_forward(x, r, t, temperature, kl, ignore_index):
    if r is None:
        return (reference.token_logprobs(x.double(), t, temperature, ignore_index),)
    return reference.logprobs_and_kl(x.double(), r.double(), t, temperature, kl, ignore_index)


LP_SHAPES = [   # (B, T, V, slice_last)
    (3, 37, 1001, False),       # odd V: every row starts at a different 16-byte phase
    (2, 19, 1001, True),        # strided x[:, :-1] view
    (1, 5, 7, False),           # fewer columns than one vector
    (2, 9, 151936, False),      # Qwen vocabulary
    (1, 6, 151937, True),       # odd big vocabulary, strided
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kl", ["none", "k1", "k2", "k3", "full"])
@pytest.mark.parametrize("shape", LP_SHAPES)
def test_logprobs_forward_vs_reference(dtype, kl, shape):
    ck = _ck()
    B, T, V, sl = shape
    gen = torch.Generator("cuda").manual_seed(1234 + V)
    x = _logits(B, T, V, dtype, slice_last=sl, gen=gen)
    r = None if kl == "none" else _logits(B, T, V, dtype, slice_last=sl, gen=gen)
    t = _targets(B, T, V, gen=gen)
    temperature = 0.7
    _poison_allocator(8 * B * T * 8)
    logp, ref_logp, kl_out, ent, stats = ck.logprobs_and_kl_forward(x, r, t.reshape(-1), temperature, kl, -100)
    ref = _ref_forward(x, r, t, temperature, kl, -100)
    valid = (t != -100).reshape(-1)
    assert_rel_close(logp, ref[0].reshape(-1), torch.float32, "logp", factor=10)
    assert torch.all(logp[~valid] == 0)
    if kl == "none":
        assert ref_logp.numel() == kl_out.numel() == ent.numel() == 0
        assert torch.all(stats[:, 2:] == 0)
    else:
        for name, out, want in (("ref_logp", ref_logp, ref[1]), ("kl", kl_out, ref[2]), ("entropy", ent, ref[3])):
            assert_rel_close(out, want.reshape(-1), torch.float32, name, factor=10)
            assert torch.all(out[~valid] == 0), name
    assert torch.all(stats[~valid] == 0)
    # stats: m is the row max of z = x * (1/T) (fp32), logsumexp(z) = m + log_s
    z = x.float().reshape(-1, V) * (1.0 / temperature)
    m = z.amax(-1)
    assert torch.equal(stats[valid, 0], m[valid])
    lse = torch.logsumexp(x.double().reshape(-1, V) / temperature, -1)
    assert rel_err(stats[valid, 0].double() + stats[valid, 1].double(), lse[valid]) < LOGPROB_TOL


GRAD_COMBOS = [("logp",), ("kl",), ("entropy",), ("logp", "kl", "entropy")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kl", ["none", "k1", "k2", "k3", "full"])
@pytest.mark.parametrize("grads", GRAD_COMBOS)
@pytest.mark.parametrize("shape", [(2, 23, 1001, True), (1, 7, 151936, False)])
def test_logprobs_backward_vs_reference(dtype, kl, grads, shape):
    ck = _ck()
    if kl == "none" and grads != ("logp",):
        pytest.skip("without a reference only logp exists")
    B, T, V, sl = shape
    gen = torch.Generator("cuda").manual_seed(99 + V)
    x = _logits(B, T, V, dtype, slice_last=sl, gen=gen)
    r = None if kl == "none" else _logits(B, T, V, dtype, slice_last=sl, gen=gen)
    t = _targets(B, T, V, gen=gen)
    temperature = 1.3
    outs = ck.logprobs_and_kl_forward(x, r, t.reshape(-1), temperature, kl, -100)
    g = {k: torch.randn(B * T, device="cuda", generator=gen) for k in grads}   # per-token upstream weights
    _poison_allocator(B * T * V * x.element_size())
    dx = ck.logprobs_and_kl_backward(g.get("logp"), g.get("kl"), g.get("entropy"), x, r, t.reshape(-1), *outs,
                                     temperature, kl, -100)
    assert dx.shape == (B, T, V) and dx.dtype == dtype and dx.is_contiguous()
    xd = x.double().requires_grad_(True)
    ref = _ref_forward(xd, r, t, temperature, kl, -100)
    names = ("logp", "ref_logp", "kl", "entropy")
    loss = sum((ref[names.index(k)].reshape(-1) * g[k].double()).sum() for k in grads)
    (want,) = torch.autograd.grad(loss, xd)
    assert_rel_close(dx, want, dtype, "dlogits", factor=2)
    assert torch.all(dx[(t == -100)] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_logprobs_minus_inf_columns(dtype):
    """Masked vocabulary entries (-inf in both models): 0·log 0 = 0, finite outputs and gradients."""
    ck = _ck()
    B, T, V = 2, 11, 515
    gen = torch.Generator("cuda").manual_seed(7)
    cols = (0, 3, 100, 514)
    x = _logits(B, T, V, dtype, neg_inf_cols=cols, gen=gen)
    r = _logits(B, T, V, dtype, neg_inf_cols=cols, gen=gen)
    t = _targets(B, T, V, gen=gen)
    masked = torch.zeros(V, dtype=torch.bool, device="cuda")
    masked[list(cols)] = True
    t = torch.where((t >= 0) & masked[t.clamp_min(0)], torch.full_like(t, 5), t)   # targets stay unmasked
    for kl in ("k3", "full"):
        outs = ck.logprobs_and_kl_forward(x, r, t.reshape(-1), 1.0, kl, -100)
        ref = reference.logprobs_and_kl(x.double(), r.double(), t, 1.0, kl, -100)
        for o, w, name in zip(outs[:4], ref, ("logp", "ref_logp", "kl", "entropy")):
            assert torch.isfinite(o).all(), name
            assert_rel_close(o, w.reshape(-1), torch.float32, name, factor=10)
        gs = [torch.randn(B * T, device="cuda", generator=gen) for _ in range(3)]
        dx = ck.logprobs_and_kl_backward(*gs, x, r, t.reshape(-1), *outs, 1.0, kl, -100)
        assert torch.isfinite(dx.float()).all()
        assert torch.all(dx[..., list(cols)] == 0)


def test_logprobs_bad_targets_nan_and_ignored_zero():
    ck = _ck()
    x = _logits(1, 4, 300, torch.bfloat16)
    t = torch.tensor([5, 300, -1, -100], device="cuda")
    logp, *_ = ck.logprobs_and_kl_forward(x, None, t, 1.0, "none", -100)
    assert torch.isfinite(logp[0]) and torch.isnan(logp[1]) and torch.isnan(logp[2]) and logp[3] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kl", ["none", "k3", "full"])
def test_logprobs_vs_triton_and_cross_backends(dtype, kl):
    """Same outputs as the Triton launchers, and each backend's backward accepts the other's forward outputs."""
    ck = _ck()
    tl_lp, _ = _triton()
    B, T, V = 3, 17, 32003
    gen = torch.Generator("cuda").manual_seed(5)
    x = _logits(B, T, V, dtype, slice_last=True, gen=gen)
    r = None if kl == "none" else _logits(B, T, V, dtype, slice_last=True, gen=gen)
    t = _targets(B, T, V, gen=gen).reshape(-1)
    oc = ck.logprobs_and_kl_forward(x, r, t, 0.9, kl, -100)
    ot = tl_lp.logprobs_and_kl_forward(x, r, t, 0.9, kl, -100)
    for a, b, name in zip(oc, ot, ("logp", "ref_logp", "kl", "entropy", "stats")):
        assert a.shape == b.shape, name
        if a.numel():
            assert_rel_close(a, b, torch.float32, name, factor=10)
    assert torch.equal(oc[4][:, 0], ot[4][:, 0])              # the row max is exact in both
    g = [torch.randn(B * T, device="cuda", generator=gen) for _ in range(3)]
    if kl == "none":
        g[1] = g[2] = None
    d_cc = ck.logprobs_and_kl_backward(*g, x, r, t, *oc, 0.9, kl, -100)
    d_ct = ck.logprobs_and_kl_backward(*g, x, r, t, *ot, 0.9, kl, -100)
    d_tc = tl_lp.logprobs_and_kl_backward(*g, x, r, t, *oc, 0.9, kl, -100)
    for d, name in ((d_ct, "cuda bwd on triton fwd"), (d_tc, "triton bwd on cuda fwd")):
        assert_rel_close(d, d_cc, dtype, name, factor=2)


def test_logprobs_rows_beyond_grid_with_qwen_vocab():
    """65 536 + 3 rows of a 151 936 vocabulary (bf16, 20 GB per tensor): every block loops over rows (the grid is
    capped at 65 535). All rows against Triton; a sample against the float64 reference."""
    ck = _ck()
    tl_lp, _ = _triton()
    free, _total = torch.cuda.mem_get_info()
    B, T, V = 1, 65536 + 3, 151936
    need = 3 * B * T * V * 2 + (8 << 30)
    if free < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB free on the GPU, has {free / 2**30:.0f}")
    gen = torch.Generator("cuda").manual_seed(3)
    x = torch.empty(B, T, V, device="cuda", dtype=torch.bfloat16).normal_(0, 3, generator=gen)
    r = torch.empty(B, T, V, device="cuda", dtype=torch.bfloat16).normal_(0, 3, generator=gen)
    t = _targets(B, T, V, gen=gen).reshape(-1)
    oc = ck.logprobs_and_kl_forward(x, r, t, 1.0, "full", -100)
    ot = tl_lp.logprobs_and_kl_forward(x, r, t, 1.0, "full", -100)
    for a, b, name in zip(oc[:4], ot[:4], ("logp", "ref_logp", "kl", "entropy")):
        assert_rel_close(a, b, torch.float32, name, factor=10)
    rows = torch.cat([torch.arange(4, device="cuda"), torch.randint(0, T, (28,), device="cuda", generator=gen),
                      torch.arange(T - 4, T, device="cuda")])
    ref = reference.logprobs_and_kl(x[0, rows].double(), r[0, rows].double(), t[rows], 1.0, "full", -100)
    for o, w, name in zip(oc[:4], ref, ("logp", "ref_logp", "kl", "entropy")):
        assert_rel_close(o[rows], w, torch.float32, name, factor=10)
    g = torch.randn(T, device="cuda", generator=gen)
    dc = ck.logprobs_and_kl_backward(g, g, g, x, r, t, *oc, 1.0, "full", -100)
    xd = x[0, rows].double().requires_grad_(True)
    ref = reference.logprobs_and_kl(xd, r[0, rows].double(), t[rows], 1.0, "full", -100)
    (want,) = torch.autograd.grad(((ref[0] + ref[2] + ref[3]) * g[rows].double()).sum(), xd)
    assert_rel_close(dc[0, rows], want, torch.bfloat16, "dlogits", factor=2)


def test_logprobs_op_backend_cuda_autograd():
    """The public op with backend='cuda' end to end (autograd, strided input, int32 targets)."""
    _ck()
    import importlib
    ops_lp = importlib.import_module("hydra_kernels.ops.logprobs")
    B, T, V = 2, 13, 4099
    gen = torch.Generator("cuda").manual_seed(11)
    x = _logits(B, T, V, torch.bfloat16, slice_last=True, gen=gen).requires_grad_(True)
    r = _logits(B, T, V, torch.bfloat16, slice_last=True, gen=gen)
    t = _targets(B, T, V, gen=gen).to(torch.int32)
    outs = ops_lp.logprobs_and_kl(x, r, t, 1.0, "k3", -100, backend="cuda")
    w = torch.randn(B, T, device="cuda", generator=gen)
    (outs[0] * w + outs[2] * w + outs[3]).sum().backward()
    xd = x.detach().double().requires_grad_(True)
    ref = reference.logprobs_and_kl(xd, r.double(), t.long(), 1.0, "k3", -100)
    (ref[0] * w + ref[2] * w + ref[3]).sum().backward()
    assert_rel_close(x.grad, xd.grad, torch.bfloat16, "dlogits", factor=2)


# ========================================================================================= LoRA linear
def _lora_inputs(S, m, K, N, r, n_adapters, dtype, *, bias=True, gen=None, same_x=False):
    dev = "cuda"
    x = torch.randn(S * m, K, device=dev, generator=gen)
    if same_x:
        x = x[:m].repeat(S, 1)
    w = torch.randn(N, K, device=dev, generator=gen) / K ** 0.5
    b = torch.randn(N, device=dev, generator=gen) if bias else None
    A = torch.randn(n_adapters, r, K, device=dev, generator=gen) / K ** 0.5
    B = torch.randn(n_adapters, N, r, device=dev, generator=gen) / r ** 0.5
    cast = (lambda t: None if t is None else t.to(dtype))
    return cast(x), cast(w), cast(b), cast(A), cast(B)


LORA_CASES = [   # (streams, rows per stream, K, N, rank, adapters, stream_adapters)
    (2, 1, 64, 96, 8, 1, (-1, 0)),            # decoding: one row per stream
    (3, 5, 136, 200, 4, 2, (0, 1, -1)),       # rank not a multiple of 8, N not a multiple of the tile
    (2, 8, 4096, 4096, 16, 2, (-1, 0)),
    (3, 16, 4096, 1024, 16, 2, (-1, 0, 1)),   # Hydra-PPO scoring: base, actor, critic
    (4, 7, 520, 1000, 24, 2, (1, -1, 1, 0)),  # streams straddle the 8-row MMA groups
    (2, 64, 2048, 2056, 64, 2, (0, 1)),       # 128 rows: the largest block
    (1, 16, 256, 130, 16, 1, (-1,)),          # base only
    (8, 3, 96, 72, 128, 3, (0, 1, 2, -1, 2, 1, 0, -1)),   # 8 streams, rank 128
]


def _lora_ref(x, w, b, A, B, scaling, sa):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.lora_linear(d(x), d(w), d(b), d(A), d(B), scaling, sa)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LORA_CASES)
@pytest.mark.parametrize("cfg", [None, (1, 1), (2, 3)])
def test_lora_small_vs_reference(dtype, case, cfg):
    ck = _ck()
    S, m, K, N, r, n, sa = case
    gen = torch.Generator("cuda").manual_seed(S * 1000 + K)
    x, w, b, A, B = _lora_inputs(S, m, K, N, r, n, dtype, gen=gen)
    scaling = [0.5 + 0.25 * i for i in range(n)]
    kw = {} if cfg is None else dict(block_m_warps=cfg[0], splits=cfg[1])
    _poison_allocator(4 * S * m * (N + r) + (1 << 20))
    y, xa = ck.lora_linear_forward(x, w, b, A, B, scaling, list(sa), **kw)
    assert y.shape == (S * m, N) and y.dtype == dtype and xa.shape == (S * m, r) and xa.dtype == torch.float32
    want = _lora_ref(x, w, b, A, B, scaling, sa)
    assert_rel_close(y, want, dtype, "y")
    for s, rows in enumerate(reference.split_streams(S * m, S)):
        if sa[s] >= 0:
            assert_rel_close(xa[rows], x[rows].double() @ A[sa[s]].double().T, torch.float32, "xa", factor=10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cfg", [(1, 1), (1, 4), (2, 2)])
@pytest.mark.parametrize("m", [1, 5, 16, 64])
def test_lora_small_exact_when_B_is_zero(dtype, cfg, m):
    """Same x in every stream and lora_B == 0: adapter streams equal the base stream bit for bit."""
    ck = _ck()
    gen = torch.Generator("cuda").manual_seed(m)
    x, w, b, A, B = _lora_inputs(2, m, 1032, 520, 16, 2, dtype, gen=gen, same_x=True)
    B.zero_()
    y, _ = ck.lora_linear_forward(x, w, b, A, B, [2.0, 0.5], [-1, 1], block_m_warps=cfg[0], splits=cfg[1])
    assert torch.equal(y[:m], y[m:]), "adapter stream differs from base with lora_B == 0"
    y2, _ = ck.lora_linear_forward(x, w, b, A, B, [2.0, 0.5], [-1, 1], block_m_warps=cfg[0], splits=cfg[1])
    assert torch.equal(y, y2), "not deterministic"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lora_small_vs_triton(dtype):
    ck = _ck()
    _, tl_lora = _triton()
    gen = torch.Generator("cuda").manual_seed(42)
    x, w, b, A, B = _lora_inputs(3, 8, 4096, 4096, 16, 2, dtype, gen=gen)
    args = (x, w, b, A, B, [2.0, 1.0], [-1, 0, 1])
    yc, xac = ck.lora_linear_forward(*args)
    yt, xat = tl_lora.lora_linear_forward(*args)
    assert_rel_close(yc, yt, dtype, "y vs triton")
    assert_rel_close(xac[8:], xat[8:], torch.float32, "xa vs triton", factor=10)


def test_lora_op_auto_picks_cuda_for_small_rows_without_grad(monkeypatch):
    _ck()
    import importlib
    op_mod = importlib.import_module("hydra_kernels.ops.lora_linear")
    monkeypatch.setenv(op_mod.CUDA_AUTO_ENV, "1")     # opt-in until the kernel is measured on a GPU
    gen = torch.Generator("cuda").manual_seed(0)
    x, w, b, A, B = _lora_inputs(2, 4, 512, 384, 8, 2, torch.bfloat16, gen=gen)
    assert op_mod._gpu_default(4, 8, n_streams=2, dtype=torch.bfloat16, in_features=512, n_adapters_used=1,
                               device=x.device) == "cuda"
    with torch.no_grad():
        y = op_mod.lora_linear(x, w, b, A, B, [1.0, 1.0], (-1, 0))
        y_cuda = op_mod.lora_linear(x, w, b, A, B, [1.0, 1.0], (-1, 0), backend="cuda")
    assert torch.equal(y, y_cuda)
    # With gradients needed the rule falls back to Triton, and the (Triton) backward works.
    A.requires_grad_(True)
    y = op_mod.lora_linear(x, w, b, A, B, [1.0, 1.0], (-1, 0))
    y.float().sum().backward()
    assert A.grad is not None and torch.isfinite(A.grad.float()).all()


def test_lora_small_rejects_what_it_cannot_take():
    ck = _ck()
    x, w, b, A, B = _lora_inputs(2, 4, 64, 32, 8, 1, torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        ck.lora_linear_forward(x.float(), w.float(), None, A.float(), B.float(), [1.0], [-1, 0])
    with pytest.raises(ValueError, match="128 rows"):
        xx = torch.randn(130, 64, device="cuda", dtype=torch.bfloat16)
        ck.lora_linear_forward(xx, w, b, A, B, [1.0], [-1, 0])
    with pytest.raises(RuntimeError, match="out of range"):
        ck.lora_linear_forward(x, w, b, A, B, [1.0], [-1, 3])
