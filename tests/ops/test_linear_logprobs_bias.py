"""ops.linear_logprobs with a biased LM head (Phi): logits h·Wᵀ + b, against reference.linear_logprobs in float64.

Both backends (triton under TRITON_INTERPRET=1), at odd shapes: V not a multiple of the vocab tile or of the
chunks, D not a multiple of the K step, chunk sizes shrunk so that every merge and boundary is crossed.
"""
import importlib

import pytest
import torch

from hydra_kernels import ops, reference
from tests._util import assert_rel_close

llp_mod = importlib.import_module("hydra_kernels.ops.linear_logprobs")
BACKENDS = ["torch", "triton"]
IGNORE = -100


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch):
    monkeypatch.setattr(llp_mod, "TORCH_CHUNK_ELEMENTS", 2 * 16 * 64)
    monkeypatch.setattr(llp_mod, "FWD_SPLITS", 3)
    monkeypatch.setattr(llp_mod, "DZ_CHUNK_TOKENS", 16)
    monkeypatch.setattr(llp_mod, "DZ_CHUNK_COLS", 96)


def make(S, T, D, V, seed=0, bias_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(T, D, generator=g)
    h = torch.stack([base + 0.3 * torch.randn(T, D, generator=g) for _ in range(S)])
    w = torch.randn(V, D, generator=g) * (2.0 / D ** 0.5)
    b = torch.randn(V, generator=g) * 1.5 + bias_shift
    tg = torch.randint(0, V, (T,), generator=g)
    tg[1] = V - 1
    tg[torch.randperm(T, generator=g)[:3]] = IGNORE
    return h, w, b, tg


def reference_terms(h, w, b, tg, temperature, kl):
    """float64 logp, entropy [S, T] and KL [T] (stream 1's logits detached in the KL, as the op's contract)."""
    logp, ent, _ = reference.linear_logprobs(h, w, tg, temperature, None, IGNORE, bias=b)
    k = None
    if kl is not None:
        logits = h @ w.T + b
        _, _, k, _ = reference.logprobs_and_kl(logits[0], logits[1].detach(), tg, temperature, kl, IGNORE)
    return logp, ent, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", [None, "k3", "full"])
@pytest.mark.parametrize("D", [48, 64])
def test_bias_forward_and_gradients_match_float64(backend, kl, D):
    """Outputs within 1e-5 and the gradients of hidden, weight and bias within fp32's tolerance of the
    float64 reference, for every upstream gradient at once."""
    S, T, V, tau = 2, 37, 257, 0.7
    h, w, b, tg = make(S, T, D, V)
    gen = torch.Generator().manual_seed(1)
    g_lp, g_ent = torch.randn(S, T, generator=gen), torch.randn(S, T, generator=gen)
    g_kl = torch.randn(T, generator=gen)

    hd = [h[s].double().requires_grad_() for s in range(S)]
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    lp_r, ent_r, k_r = reference_terms(torch.stack(hd), wd, bd, tg, tau, kl)

    hs = [h[s].clone().requires_grad_() for s in range(S)]
    wt, bt = w.clone().requires_grad_(), b.clone().requires_grad_()
    lp, ent, k = ops.linear_logprobs(hs, wt, tg, tau, kl, IGNORE, bias=bt, backend=backend)
    assert (lp.double() - lp_r).abs().max() <= 1e-5
    assert (ent.double() - ent_r).abs().max() <= 1e-5
    if kl is not None:
        assert (k.double() - k_r).abs().max() <= 1e-5 * max(1.0, k_r.abs().max().item())
    ignored = tg == IGNORE
    assert torch.all(lp[:, ignored] == 0) and torch.all(ent[:, ignored] == 0)

    loss_r = (lp_r * g_lp.double()).sum() + (ent_r * g_ent.double()).sum()
    loss = (lp * g_lp).sum() + (ent * g_ent).sum()
    if kl is not None:
        loss_r, loss = loss_r + (k_r * g_kl.double()).sum(), loss + (k * g_kl).sum()
    loss_r.backward()
    loss.backward()
    for s in range(S):
        assert_rel_close(hs[s].grad, hd[s].grad, torch.float32, f"dhidden[{s}] {backend} kl={kl}", factor=0.5)
    assert_rel_close(wt.grad, wd.grad, torch.float32, f"dweight {backend} kl={kl}", factor=0.5)
    assert bt.grad.dtype == torch.float32
    assert_rel_close(bt.grad, bd.grad, torch.float32, f"dbias {backend} kl={kl}", factor=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradient_with_frozen_weight_and_one_stream_needing_grad(backend):
    """dbias sums dz over every stream, also those whose hidden needs no gradient, in the frozen-weight
    (token-chunked) layout of the triton backward."""
    S, T, D, V = 2, 29, 40, 131
    h, w, b, tg = make(S, T, D, V, seed=3)
    hd0, bd = h[0].double().requires_grad_(), b.double().requires_grad_()
    lp_r, ent_r, _ = reference.linear_logprobs(torch.stack([hd0, h[1].double()]), w.double(), tg, 1.3, None,
                                               IGNORE, bias=bd)
    (lp_r.sum() + 0.5 * ent_r.sum()).backward()
    h0, bt = h[0].clone().requires_grad_(), b.clone().requires_grad_()
    lp, ent, _ = ops.linear_logprobs([h0, h[1]], w, tg, 1.3, None, IGNORE, bias=bt, backend=backend)
    (lp.sum() + 0.5 * ent.sum()).backward()
    assert_rel_close(h0.grad, hd0.grad, torch.float32, "dhidden[0]", factor=0.5)
    assert_rel_close(bt.grad, bd.grad, torch.float32, "dbias", factor=0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_columns_past_the_vocabulary_stay_minus_inf_with_a_bias(backend):
    """Every real logit far below 0 (bias −60): a column past V read as 0 (a phantom token) would take
    almost all the probability mass and wreck log-probs and entropy."""
    S, T, D, V = 1, 21, 24, 45                           # 45: no tile or chunk size divides it
    h, w, b, tg = make(S, T, D, V, seed=5, bias_shift=-60.0)
    lp, ent, _ = ops.linear_logprobs(h[0], w, tg, 1.0, None, IGNORE, bias=b, backend=backend)
    lp_r, ent_r, _ = reference.linear_logprobs(h.double(), w.double(), tg, 1.0, None, IGNORE, bias=b.double())
    assert (lp.double() - lp_r[0]).abs().max() <= 1e-5
    assert (ent.double() - ent_r[0]).abs().max() <= 1e-5


def test_bias_changes_the_result_and_bad_bias_names_the_argument():
    h, w, b, tg = make(1, 8, 16, 30)
    with_bias, _, _ = ops.linear_logprobs(h[0], w, tg, bias=b, backend="torch")
    without, _, _ = ops.linear_logprobs(h[0], w, tg, backend="torch")
    assert (with_bias - without).abs().max() > 0.1
    for bad in (b[:-1], b.double(), b.reshape(2, 15), torch.randn(30, device="meta")):
        with pytest.raises(ValueError, match=r"^bias:"):
            ops.linear_logprobs(h[0], w, tg, bias=bad, backend="torch")


def test_bias_traces_under_torch_compile():
    h, w, b, tg = make(2, 9, 16, 40)

    def f(h0, h1, w, b):
        lp, ent, k = ops.linear_logprobs([h0, h1], w, tg, 0.8, "k3", bias=b, backend="torch")
        return lp.sum() + ent.sum() + k.sum()

    args_e = [h[0].clone().requires_grad_(), h[1].clone(), w.clone(), b.clone().requires_grad_()]
    args_c = [a.detach().clone().requires_grad_(a.requires_grad) for a in args_e]
    out_e = f(*args_e)
    out_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*args_c)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    out_e.backward()
    out_c.backward()
    torch.testing.assert_close(args_c[3].grad, args_e[3].grad, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
@pytest.mark.parametrize("kl", ["k3", "full"])
def test_gpu_bias_bf16_matches_the_torch_backend(kl):
    """The compiled Triton kernels with a bias (Phi-2's head shape), bf16, two streams: outputs and the
    gradients of hidden and bias against the exact fp32 torch backend."""
    S, T, D, V = 2, 1024, 2560, 51200
    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(T, D, device="cuda", generator=g)
    h = torch.stack([base + 0.3 * torch.randn(T, D, device="cuda", generator=g) for _ in range(S)]).bfloat16()
    w = (torch.randn(V, D, device="cuda", generator=g) * (4.0 / D ** 0.5)).bfloat16()
    b = torch.randn(V, device="cuda", generator=g).bfloat16()
    tg = torch.randint(0, V, (T,), device="cuda", generator=g)
    tg[::7] = IGNORE
    grads = {}
    for backend in ("torch", "triton"):
        h0, bb = h[0].clone().requires_grad_(), b.clone().requires_grad_()
        lp, ent, k = ops.linear_logprobs([h0, h[1]], w, tg, 0.9, kl, IGNORE, bias=bb, backend=backend)
        (lp[0].sum() + 0.1 * ent[0].sum() + k.sum()).backward()
        grads[backend] = (lp, ent, k, h0.grad, bb.grad)
    for o, r in zip(grads["triton"][:3], grads["torch"][:3]):
        assert (o - r).abs().max().item() <= 2e-3
    assert_rel_close(grads["triton"][3], grads["torch"][3], torch.bfloat16, "dhidden")
    assert_rel_close(grads["triton"][4], grads["torch"][4], torch.bfloat16, "dbias")
