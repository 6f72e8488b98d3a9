"""ops.linear_logprobs (LM head fused with log-probs / entropy / KL) against float64 references.

CPU: the torch backend natively, the triton backend under TRITON_INTERPRET=1 (tiny shapes: the interpreter
runs every tile op in numpy). Chunk sizes and vocab splits are shrunk so that every online merge, every
chunk boundary and a partial last vocab tile are exercised at these sizes.
"""
import importlib
import itertools

import pytest
import torch

from hydra_kernels import ops, reference
llp_mod = importlib.import_module("hydra_kernels.ops.linear_logprobs")      # the package exports the function
from tests._util import assert_rel_close

BACKENDS = ["torch", "triton"]
KLS = [None, *ops.KL_ESTIMATORS]
IGNORE = -100


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    # torch backend: 64-column logit chunks of 16 tokens (S = 2); triton: forward in 3 vocab splits,
    # backward in 16-token / 96-column dz chunks. None of these divides the shapes below.
    monkeypatch.setattr(llp_mod, "TORCH_CHUNK_ELEMENTS", 2 * 16 * 64)
    monkeypatch.setattr(llp_mod, "FWD_SPLITS", 3)
    monkeypatch.setattr(llp_mod, "DZ_CHUNK_TOKENS", 16)
    monkeypatch.setattr(llp_mod, "DZ_CHUNK_COLS", 96)


def make(S, T, D, V, dtype=torch.float32, scale=2.0, seed=0, n_ignored=3):
    """Streams that are perturbations of one another (as policy and reference are), logits of O(scale)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(T, D, generator=g)
    h = torch.stack([base + 0.3 * torch.randn(T, D, generator=g) for _ in range(S)])
    w = torch.randn(V, D, generator=g) * (scale / D ** 0.5)
    tg = torch.randint(0, V, (T,), generator=g)
    tg[1] = V - 1                                        # a target at the last vocab index
    tg[torch.randperm(T, generator=g)[:n_ignored]] = IGNORE
    return h.to(dtype), w.to(dtype), tg


def ref_loss_terms(h, w, tg, temperature, kl):
    """float64 outputs with autograd: logp, entropy [S, T] and KL [T] with stream 1's logits detached
    (the op's contract: KL's gradient flows through stream 0 only)."""
    logp, ent, _ = reference.linear_logprobs(h, w, tg, temperature, None, IGNORE)
    k = None
    if kl is not None:
        logits = h @ w.T
        _, _, k, _ = reference.logprobs_and_kl(logits[0], logits[1].detach(), tg, temperature, kl, IGNORE)
    return logp, ent, k


def check_forward_backward(backend, S, T, D, V, kl, dtype=torch.float32, temperature=0.7, use=(1, 1, 1),
                           w_grad=False, grad_streams=None, seed=0, tol_out=1e-5, scale=2.0):
    h, w, tg = make(S, T, D, V, dtype, seed=seed, scale=scale)
    gen = torch.Generator().manual_seed(seed + 1)
    g_lp, g_ent, g_kl = torch.randn(S, T, generator=gen), torch.randn(S, T, generator=gen), torch.randn(T, generator=gen)
    grad_streams = list(range(S)) if grad_streams is None else grad_streams

    hd = [h[s].double().requires_grad_(s in grad_streams) for s in range(S)]
    wd = w.double().requires_grad_(w_grad)
    lp_r, ent_r, k_r = ref_loss_terms(torch.stack(hd), wd, tg, temperature, kl)

    hs = [h[s].clone().requires_grad_(s in grad_streams) for s in range(S)]
    wt = w.clone().requires_grad_(w_grad)
    lp, ent, k = ops.linear_logprobs(hs, wt, tg, temperature, kl, IGNORE, backend=backend)
    assert lp.dtype == torch.float32 and lp.shape == (S, T) and ent.shape == (S, T)
    assert (k is None) == (kl is None)
    # bf16/fp16: the reference is float64 on the same (rounded) inputs, so the same bound applies.
    assert (lp.double() - lp_r).abs().max() <= tol_out
    assert (ent.double() - ent_r).abs().max() <= tol_out
    if kl is not None:
        kl_tol = tol_out * max(1.0, k_r.abs().max().item())       # k2/k3 grow like d², e^d
        assert (k.double() - k_r).abs().max() <= kl_tol, kl
    ignored = tg == IGNORE
    assert torch.all(lp[:, ignored] == 0) and torch.all(ent[:, ignored] == 0)
    if kl is not None:
        assert torch.all(k[ignored] == 0)

    if not (grad_streams or w_grad) or not any(use):
        return
    loss_r = 0.0
    loss = 0.0
    if use[0]:
        loss_r, loss = loss_r + (lp_r * g_lp.double()).sum(), loss + (lp * g_lp).sum()
    if use[1]:
        loss_r, loss = loss_r + (ent_r * g_ent.double()).sum(), loss + (ent * g_ent).sum()
    if use[2] and kl is not None:
        loss_r, loss = loss_r + (k_r * g_kl.double()).sum(), loss + (k * g_kl).sum()
    if not torch.is_tensor(loss):
        return
    loss_r.backward()
    loss.backward()
    tol_dtype = torch.float32 if dtype == torch.float32 else dtype
    for s in range(S):
        if s in grad_streams:
            assert hs[s].grad is not None and hs[s].grad.dtype == dtype
            assert_rel_close(hs[s].grad, hd[s].grad, tol_dtype, f"dhidden[{s}] {backend} kl={kl} use={use}",
                             factor=0.5 if dtype == torch.float32 else 1.0)
            assert torch.all(hs[s].grad[ignored] == 0), "ignored tokens must get zero gradient"
        else:
            assert hs[s].grad is None
    if w_grad:
        assert wt.grad.dtype == dtype
        assert_rel_close(wt.grad, wd.grad, tol_dtype, f"dweight {backend} kl={kl}",
                         factor=0.5 if dtype == torch.float32 else 1.0)


# --------------------------------------------------------------------------------------- forward, fp32
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", KLS)
def test_forward_fp32_all_kl_modes(backend, kl):
    S = 1 if kl is None else 2
    check_forward_backward(backend, S, 37, 48, 257, kl, use=(0, 0, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_large_vocab_three_streams_kl_full(backend):
    check_forward_backward(backend, 3, 23, 40, 1000, "full", temperature=1.3, use=(0, 0, 0), seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_streams_than_one_launch(backend):
    """S = 5 > MAX_STREAMS: the triton forward runs two launches, the KL pair in the first."""
    check_forward_backward(backend, 5, 9, 32, 97, "full", use=(1, 1, 1), grad_streams=[0, 4], seed=5)


# -------------------------------------------------------------------------------------- backward, fp32
@pytest.mark.parametrize("use", [u for u in itertools.product((0, 1), repeat=3) if any(u)])
@pytest.mark.parametrize("kl", ["k3", "full"])
def test_backward_every_upstream_combination_torch(use, kl):
    check_forward_backward("torch", 2, 37, 48, 257, kl, use=use, grad_streams=[0, 1], seed=7)


@pytest.mark.parametrize("use,kl", [((1, 0, 0), None), ((0, 1, 0), "k1"), ((0, 0, 1), "full"), ((1, 1, 1), "full"),
                                    ((1, 0, 1), "k2"), ((0, 1, 1), "k3")])
def test_backward_upstream_combinations_triton(use, kl):
    S = 1 if kl is None else 2
    check_forward_backward("triton", S, 21, 40, 131, kl, use=use, seed=11)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl,grad_streams", [("full", [0]), ("k3", [0]), ("full", [1]), (None, [1, 2])])
def test_backward_detached_reference_stream(backend, kl, grad_streams):
    """The PPO case: only the actor stream requires grad; the reference stream gets none (and none is formed)."""
    check_forward_backward(backend, 3 if kl is None else 2, 21, 40, 131, kl, grad_streams=grad_streams, seed=13)


@pytest.mark.parametrize("S,kl,grad_streams", [(2, "full", [0]), (3, None, [2])])
def test_backward_vocab_layout_frozen_weight_triton(monkeypatch, S, kl, grad_streams):
    """The triton backward's other chunking (all tokens × vocab slices, dH summed in fp32) with a frozen head."""
    monkeypatch.setattr(llp_mod, "DZ_LAYOUT", "vocab")
    check_forward_backward("triton", S, 21, 40, 131, kl, grad_streams=grad_streams, seed=41)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl,grad_streams", [("full", [0, 1]), ("k3", []), (None, [0])])
def test_backward_weight_grad(backend, kl, grad_streams):
    S = 1 if kl is None else 2
    check_forward_backward(backend, S, 21, 40, 131, kl, w_grad=True, grad_streams=grad_streams, seed=17)


# ------------------------------------------------------------------------------------------ 16-bit inputs
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fwd_bwd(backend, dtype):
    check_forward_backward(backend, 2, 21, 48, 131, "full", dtype=dtype, temperature=0.9, w_grad=True, seed=19,
                           tol_out=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_no_worse_than_pytorch_log_softmax(backend):
    """bf16 hidden/weight: error vs float64 on the same bf16 inputs ≤ 2e-3 nats and no worse than
    PyTorch's log_softmax((h.float() @ W.float().T) / T) (fp32 logits, the best a user gets unfused)."""
    S, T, D, V, temp = 2, 33, 64, 1000, 0.8
    h, w, tg = make(S, T, D, V, torch.bfloat16, scale=8.0, seed=23)
    ref = reference.linear_logprobs(h.double(), w.double(), tg, temp, "full", IGNORE)
    lp, ent, k = ops.linear_logprobs(h, w, tg, temp, "full", IGNORE, backend=backend)
    z = (h.float() @ w.float().T) / temp
    base_lp = reference.token_logprobs(z, tg.expand(S, -1), 1.0, IGNORE)
    base_all = torch.log_softmax(z, -1)
    base_ent = -(base_all.exp() * base_all).sum(-1) * (tg != IGNORE)
    err = (lp.double() - ref[0]).abs().max().item()
    err_base = (base_lp.double() - ref[0]).abs().max().item()
    err_ent = (ent.double() - ref[1]).abs().max().item()
    err_ent_base = (base_ent.double() - ref[1]).abs().max().item()
    assert err <= 2e-3 and (k.double() - ref[2]).abs().max().item() <= 2e-3 and err_ent <= 2e-3
    # fp32 noise on both sides: "no worse" up to a factor for rounding-order luck, plus an absolute floor.
    assert err <= 2 * err_base + 2e-6, (err, err_base)
    assert err_ent <= 2 * err_ent_base + 2e-6, (err_ent, err_ent_base)


# ------------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_phantom_tokens_when_vocab_is_not_a_tile_multiple(backend):
    """All logits ≈ −30: an out-of-range column read as 0 (instead of −inf) would add e^0 ≫ Σe^z to the
    log-sum-exp. V = 257 leaves one real column in the last 32-wide tile and a partial last split."""
    T, D, V = 17, 32, 257
    g = torch.Generator().manual_seed(29)
    h = torch.rand(T, D, generator=g) + 0.5
    w = -(torch.rand(V, D, generator=g) + 0.5) * (30.0 / D)
    tg = torch.randint(0, V, (T,), generator=g)
    lp, ent, _ = ops.linear_logprobs(h, w, tg, backend=backend)
    ref = reference.linear_logprobs(h[None].double(), w.double(), tg)
    assert lp.shape == (T,)                      # [T, D] input: no stream dimension in the outputs
    assert (lp.double() - ref[0][0]).abs().max() <= 1e-5
    assert (ent.double() - ref[1][0]).abs().max() <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_all_ignored_and_leading_dims(backend):
    """Logits of ±1e4, a fully ignored row of tokens, hidden [S, B, T, D] with targets [B, T]."""
    S, B, T, D, V = 2, 2, 5, 16, 70
    g = torch.Generator().manual_seed(31)
    h = torch.randn(S, B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) * (1e4 / 4 / D ** 0.5)
    tg = torch.randint(0, V, (B, T), generator=g)
    tg[1] = IGNORE
    hg = h.clone().requires_grad_(True)
    lp, ent, k = ops.linear_logprobs(hg, w, tg, 1.0, "full", IGNORE, backend=backend)
    assert lp.shape == (S, B, T) and k.shape == (B, T)
    ref = reference.linear_logprobs(h.reshape(S, B * T, D).double(), w.double(), tg.reshape(-1), 1.0, "full")
    for out, r in zip((lp.reshape(S, -1), ent.reshape(S, -1), k.reshape(-1)), ref):
        assert torch.isfinite(out).all()
        # fp32 logits of magnitude 1e4 carry ~1e-3 absolute rounding; the statistics must not add more.
        assert (out.double() - r).abs().max() <= 2e-2
    assert torch.all(lp[:, 1] == 0) and torch.all(k[1] == 0)
    (lp.sum() + ent.sum() + k.sum()).backward()
    assert torch.isfinite(hg.grad).all() and torch.all(hg.grad[:, 1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend):
    h = torch.randn(2, 0, 8, requires_grad=True)
    lp, ent, k = ops.linear_logprobs(h, torch.randn(11, 8), torch.zeros(0, dtype=torch.long), kl="k3",
                                     backend=backend)
    assert lp.shape == (2, 0) and k.shape == (0,)
    (lp.sum() + k.sum()).backward()
    assert h.grad.shape == (2, 0, 8)


def test_single_tensor_input_matches_list_input():
    h, w, tg = make(2, 13, 24, 50)
    a = ops.linear_logprobs(h, w, tg, 1.1, "k2", backend="torch")
    b = ops.linear_logprobs([h[0], h[1]], w, tg, 1.1, "k2", backend="torch")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    h, w, tg = make(2, 13, 32, 70, seed=37)

    def f(h0, h1, w):
        lp, ent, k = ops.linear_logprobs([h0, h1], w, tg, 0.6, "full", backend=backend)
        return (lp * torch.arange(13.0)).sum() + ent[0].sum() - 0.5 * (k * k).sum()

    args_e = [h[0].clone().requires_grad_(), h[1].clone(), w.clone().requires_grad_()]
    args_c = [a.detach().clone().requires_grad_(a.requires_grad) for a in args_e]
    out_e = f(*args_e)
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*args_c)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    out_e.backward()
    out_c.backward()
    torch.testing.assert_close(args_c[0].grad, args_e[0].grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(args_c[2].grad, args_e[2].grad, rtol=1e-6, atol=1e-7)


def test_no_python_float_reaches_a_triton_kernel(monkeypatch):
    """Temperature travels as a one-element fp32 tensor (a Python float would turn into an fp64 kernel
    argument under Inductor)."""
    from hydra_kernels.kernels.triton import linear_logprobs as K
    seen = []
    for kern in (K._fwd_kernel, K._dz_kernel):
        orig = kern.run

        def spy(*args, _orig=orig, **kwargs):
            seen.append([a for a in args if isinstance(a, float)] +
                        [v for k, v in kwargs.items() if isinstance(v, float)])
            return _orig(*args, **kwargs)
        monkeypatch.setattr(kern, "run", spy)
    h, w, tg = make(2, 9, 16, 40)
    hg = h.clone().requires_grad_()
    lp, _, k = ops.linear_logprobs(hg, w, tg, 0.37, "full", backend="triton")
    (lp.sum() + k.sum()).backward()
    assert len(seen) >= 2 and all(not floats for floats in seen)


def test_process_wide_cuda_preference_falls_back(monkeypatch):
    """HYDRA_KERNELS_BACKEND=cuda (meant for the ops that have CUDA kernels) must not break this op."""
    monkeypatch.setenv("HYDRA_KERNELS_BACKEND", "cuda")
    h, w, tg = make(1, 5, 8, 20)
    lp, _, _ = ops.linear_logprobs(h[0], w, tg)
    assert lp.shape == (5,)


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_names_the_argument():
    h, w, tg = make(2, 6, 8, 20, n_ignored=0)
    cases = [
        (dict(w=torch.randn(20, 9)), "weight"),                        # D mismatch
        (dict(tg=tg[:5]), "targets"),                                   # length mismatch
        (dict(tg=torch.full((6,), 20)), "targets"),                     # target ≥ V
        (dict(tg=torch.full((6,), -3)), "targets"),                     # negative, not ignore_index
        (dict(tg=tg.float()), "targets"),
        (dict(h=h[:1], kl="k3"), "kl"),                                 # KL needs two streams
        (dict(kl="k4"), "kl"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=-1.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(temperature=torch.tensor(0.7)), "temperature"),          # a kernel constant: a Python float
        (dict(w=w.half()), "weight"),                                   # dtype mismatch
        (dict(w=w.to("meta")), "weight"),                               # device mismatch
        (dict(h=h.double(), w=w.double()), "hidden"),                   # unsupported dtype
        (dict(h=torch.randn(6)), "hidden"),
        (dict(h=[h[0], h[1, :5]]), "hidden"),
        (dict(w=torch.randn(20)), "weight"),
        (dict(backend="cuda"), "backend"),
        (dict(ignore_index=1.5), "ignore_index"),
    ]
    for change, name in cases:
        a = dict(h=h, w=w, tg=tg, temperature=1.0, kl=None, ignore_index=IGNORE, backend="torch") | change
        with pytest.raises(ValueError, match=rf"^{name}(\[\d+\])?:"):
            ops.linear_logprobs(a["h"], a["w"], a["tg"], a["temperature"], a["kl"], a["ignore_index"],
                                backend=a["backend"])


# ------------------------------------------------------------------------------------------------ GPU
def _gpu_case(S, T, D, V, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    base = torch.randn(T, D, device="cuda", generator=g)
    h = torch.stack([base + 0.3 * torch.randn(T, D, device="cuda", generator=g) for _ in range(S)]).to(dtype)
    w = (torch.randn(V, D, device="cuda", generator=g) * (4.0 / D ** 0.5)).to(dtype)
    tg = torch.randint(0, V, (T,), device="cuda", generator=g)
    tg[::7] = IGNORE
    tg[1] = V - 1
    return h, w, tg


@pytest.mark.gpu
@pytest.mark.parametrize("kl", ["k3", "full"])
def test_gpu_qwen_head_bf16_fwd_bwd_and_memory(kl, monkeypatch):
    """V=151936, D=896 (Qwen2-0.5B head), T=4096, bf16, two streams: accuracy vs the torch backend (fp32,
    chunked, exact) and peak extra memory ≤ 5% of what fp32 logits [S, T, V] would take."""
    # Production chunking (the autouse fixture shrinks it for the CPU tests).
    monkeypatch.setattr(llp_mod, "TORCH_CHUNK_ELEMENTS", 1 << 24)
    for name in ("FWD_SPLITS", "DZ_CHUNK_TOKENS", "DZ_CHUNK_COLS"):
        monkeypatch.setattr(llp_mod, name, None)
    S, T, D, V = 2, 4096, 896, 151936
    h, w, tg = _gpu_case(S, T, D, V, torch.bfloat16)
    ref = ops.linear_logprobs(h, w, tg, 0.9, kl, backend="torch")
    out = ops.linear_logprobs(h, w, tg, 0.9, kl, backend="triton")          # also autotunes
    for o, r in zip(out, ref):
        assert (o - r).abs().max().item() <= 2e-3
    logits_fp32 = S * T * V * 4
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ha = h[0].clone().requires_grad_()
    lp, ent, k = ops.linear_logprobs([ha, h[1]], w, tg, 0.9, kl, backend="triton")
    fwd_peak = torch.cuda.max_memory_allocated() - before
    (lp[0].sum() + 0.1 * ent[0].sum() + k.sum()).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    assert fwd_peak <= 0.05 * logits_fp32, (fwd_peak, logits_fp32)
    assert peak <= 0.05 * logits_fp32, (peak, logits_fp32)

    hr = h[0].clone().requires_grad_()
    lp_r, ent_r, k_r = ops.linear_logprobs([hr, h[1]], w, tg, 0.9, kl, backend="torch")
    (lp_r[0].sum() + 0.1 * ent_r[0].sum() + k_r.sum()).backward()
    assert_rel_close(ha.grad, hr.grad, torch.bfloat16, "dhidden")


@pytest.mark.gpu
def test_gpu_fp32_and_long_sequence():
    """fp32 at 1e-5 against float64, and T > 65535 tokens (grid axis 0 only)."""
    S, T, D, V = 2, 70000, 64, 1000
    h, w, tg = _gpu_case(S, T, D, V, torch.float32, seed=1)
    hg = h.clone().requires_grad_()
    lp, ent, k = ops.linear_logprobs(hg, w, tg, 0.7, "full", backend="triton")
    ref = reference.linear_logprobs(h.double(), w.double(), tg, 0.7, "full")
    for o, r in zip((lp, ent, k), ref):
        assert (o.double() - r).abs().max().item() <= 1e-5
    (lp.sum() + ent.sum()).backward()
    hd = h.double().requires_grad_()
    lp_r, ent_r, _ = reference.linear_logprobs(hd, w.double(), tg, 0.7, None)
    (lp_r.sum() + ent_r.sum()).backward()
    assert_rel_close(hg.grad, hd.grad, torch.float32, "dhidden", factor=0.5)
