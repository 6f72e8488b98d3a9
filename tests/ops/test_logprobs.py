"""ops.token_logprobs / ops.logprobs_and_kl against reference.py in float64, forward and backward.

Backends `torch` and `triton` (under TRITON_INTERPRET=1 on CPU). Interpreter shapes are small; the
interpreter uses 256-wide vocab tiles, so V = 1000 runs four tiles per row with a partial last one.
"""
import importlib.util
import itertools
import math
import pathlib

import pytest
import torch

from hydra_kernels import ops, reference
from hydra_kernels.kernels.triton import triton_interpreting
from hydra_kernels.ops import logprobs as lp_mod
from tests._util import REL_TOL, poison_, rel_err

# CPU-tensor Triton runs need the interpreter; conftest turns it on only where no GPU exists. On a GPU
# machine run `TRITON_INTERPRET=1 pytest -m "not gpu" tests/ops/test_logprobs.py` for these.
needs_interpreter = pytest.mark.skipif(not triton_interpreting(),
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]
GPU_BACKENDS = ["torch", "triton"]
KLS = list(ops.KL_ESTIMATORS)              # every estimator the ops take
IGN = -100
ROOT = pathlib.Path(__file__).resolve().parents[2]

# The triton interpreter does numpy math on masked lanes too (log 0, 0 * inf) and warns; results are masked.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


# ------------------------------------------------------------------------------------------- helpers
def make(shape=(2, 5), V=1000, dtype=torch.float32, scale=2.0, seed=0, ref_noise=0.3):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, V, generator=g) * scale)
    r = x + ref_noise * torch.randn(*shape, V, generator=g)
    t = torch.randint(0, V, shape, generator=g)
    flat = t.view(-1)
    flat[1] = IGN                     # an ignored row
    flat[-1] = V - 1                  # a target at the last vocab index (the masked last tile's last column)
    return x.to(dtype), r.to(dtype), t


def weights(shape, seed=1):
    """Different per-token upstream weights for (logp, kl, entropy): the PPO case."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(3)]


def _finite(x):
    # float64 stand-in for -inf that keeps the reference's autograd free of 0 * inf (its outputs are identical).
    return torch.where(x == float("-inf"), torch.full_like(x, -1e300), x)


def ref_run(x, r, t, T, kl, w, ignore_index=IGN):
    """float64 reference outputs and d(loss)/dx for loss = sum w_logp*logp + w_kl*kl + w_ent*entropy."""
    xd = _finite(x.double()).requires_grad_(True)
    if r is None:
        outs = (reference.token_logprobs(xd, t, T, ignore_index),)
        terms = [(outs[0], w[0])]
    else:
        outs = reference.logprobs_and_kl(xd, _finite(r.double()), t, T, kl, ignore_index)
        terms = [(outs[0], w[0]), (outs[2], w[1]), (outs[3], w[2])]
    loss = sum((o * wi).sum() for o, wi in terms if wi is not None)
    grad = torch.autograd.grad(loss, xd)[0]
    return [o.detach() for o in outs], grad


def op_run(backend, x, r, t, T, kl, w, ignore_index=IGN):
    xg = x.clone().requires_grad_(True)
    if r is None:
        outs = (ops.token_logprobs(xg, t, T, ignore_index, backend=backend),)
        terms = [(outs[0], w[0])]
    else:
        outs = ops.logprobs_and_kl(xg, r, t, T, kl, ignore_index, backend=backend)
        terms = [(outs[0], w[0]), (outs[2], w[1]), (outs[3], w[2])]
    loss = sum((o * wi.float()).sum() for o, wi in terms if wi is not None)
    grad = torch.autograd.grad(loss, xg)[0]
    return [o.detach() for o in outs], grad


def assert_close(out, ref, what, atol=1e-5, rtol=0.0):
    assert out.dtype == torch.float32, f"{what}: dtype {out.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} vs {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = (out.double() - ref).abs()
    excess = (err - atol - rtol * ref.abs()).max().item()
    assert excess <= 0, f"{what}: max |err| {err.max().item():.3g} exceeds atol {atol} + rtol {rtol}"


def check_outputs(outs, refs, kl, atol=1e-5, rtol=0.0):
    names = ["logp", "ref_logp", "kl", "entropy"]
    for name, o, q in zip(names, outs, refs):
        # Sampled estimators propagate the log-prob error times |d|: allow a matching relative part.
        extra = 1e-5 if (name == "kl" and kl != "full") else 0.0
        assert_close(o, q, name, atol=atol, rtol=rtol + extra)


def check_grad(g, gref, dtype, what="dlogits", factor=1.0):
    assert g.dtype == dtype and g.shape == gref.shape
    tol = (1e-5 if dtype == torch.float32 else REL_TOL[dtype]) * factor
    err = rel_err(g, gref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------------------------ accuracy, fp32
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", KLS)
@pytest.mark.parametrize("T", [1.0, 0.7])
def test_logprobs_and_kl_fp32(backend, kl, T):
    x, r, t = make()
    w = weights(t.shape)
    refs, gref = ref_run(x, r, t, T, kl, w)
    outs, g = op_run(backend, x, r, t, T, kl, w)
    check_outputs(outs, refs, kl)
    check_grad(g, gref, torch.float32)
    assert torch.count_nonzero(g.view(-1, x.shape[-1])[1]) == 0          # the ignored row
    assert all(o.view(-1)[1].item() == 0 for o in outs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1.0, 1.3])
def test_token_logprobs(backend, dtype, T):
    x, _, t = make(shape=(3, 4), V=777, dtype=dtype, seed=2)
    w = weights(t.shape)
    refs, gref = ref_run(x, None, t, T, None, w)          # float64 on the same rounded inputs
    outs, g = op_run(backend, x, None, t, T, None, w)
    assert_close(outs[0], refs[0], "logp")
    check_grad(g, gref, dtype)


def test_float64_inputs_torch_backend():
    """float64 logits run in float64 on the torch backend (outputs are still float32)."""
    x, r, t = make(shape=(2, 3), V=200, dtype=torch.float64, seed=24)
    w = weights(t.shape)
    refs, gref = ref_run(x, r, t, 0.6, "full", w)
    outs, g = op_run("torch", x, r, t, 0.6, "full", w)
    check_outputs(outs, refs, "full", atol=1e-6)
    assert g.dtype == torch.float64 and rel_err(g, gref) < 1e-6      # upstream weights went through fp32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kl", ["k3", "full"])
def test_low_precision_inputs(backend, dtype, kl):
    x, r, t = make(shape=(2, 4), V=600, dtype=dtype, seed=3)
    w = weights(t.shape)
    refs, gref = ref_run(x, r, t, 0.9, kl, w)
    outs, g = op_run(backend, x, r, t, 0.9, kl, w)
    check_outputs(outs, refs, kl)                        # fp32 math: still 1e-5 on the rounded inputs
    check_grad(g, gref, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["k3", "full"])
def test_every_combination_of_upstream_gradients(backend, kl):
    """Any subset of (logp, kl, entropy) carries gradient, each with its own per-token weights."""
    x, r, t = make(shape=(3, 3), V=300, seed=4)
    w = weights(t.shape, seed=5)
    xg = x.clone().requires_grad_(True)
    outs = ops.logprobs_and_kl(xg, r, t, 0.8, kl, backend=backend)
    xd = x.double().requires_grad_(True)
    refs = reference.logprobs_and_kl(xd, r.double(), t, 0.8, kl)
    picks = {"logp": 0, "kl": 2, "entropy": 3}
    for n in (1, 2, 3):
        for combo in itertools.combinations(picks, n):
            loss = sum((outs[picks[c]] * w[i].float()).sum() for i, c in enumerate(combo))
            lref = sum((refs[picks[c]] * w[i]).sum() for i, c in enumerate(combo))
            g, = torch.autograd.grad(loss, xg, retain_graph=True)
            gref, = torch.autograd.grad(lref, xd, retain_graph=True)
            check_grad(g, gref, torch.float32, what=f"grad of {combo}")
            assert torch.count_nonzero(g.view(-1, 300)[1]) == 0, f"{combo}: ignored row has gradient"


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_upstream_gradient_via_sum(backend):
    """.sum() hands the backward an expanded (stride-0) gradient; it must be read as a normal tensor."""
    x, r, t = make(shape=(2, 3), V=200, seed=6)
    xg = x.clone().requires_grad_(True)
    lp, _, k, h = ops.logprobs_and_kl(xg, r, t, kl="k3", backend=backend)
    (lp.sum() + 0.1 * k.sum() - 0.01 * h.sum()).backward()
    xd = x.double().requires_grad_(True)
    lpr, _, kr, hr = reference.logprobs_and_kl(xd, r.double(), t, kl="k3")
    (lpr.sum() + 0.1 * kr.sum() - 0.01 * hr.sum()).backward()
    check_grad(xg.grad, xd.grad, torch.float32)


# --------------------------------------------------------------------------------------- edge cases
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1.0, 0.5])
def test_extreme_logits(backend, T):
    """Logits at +-1e4 (ties at the max, targets far below it): no overflow, no lost digits."""
    g = torch.Generator().manual_seed(7)
    V = 500
    x = torch.randn(6, V, generator=g)
    x[:, ::7] = 1e4
    x[:, 3::11] = -1e4
    x[0, :] = -1e4
    x[0, 123] = 1e4                                        # one-hot row: entropy 0, logp 0 at the max
    r = x.clone()
    r[:, 5::13] = 1e4
    r[1] = torch.randn(V, generator=g) * 1e4              # a reference nothing like the actor
    t = torch.tensor([123, 3, 0, 7, V - 1, 14])           # -1e4 targets give logp ~ -2e4 / T
    w = weights(t.shape, seed=8)
    for kl in ("full", "k1"):
        refs, gref = ref_run(x, r, t, T, kl, w)
        outs, gr = op_run(backend, x, r, t, T, kl, w)
        # fp32 holds |logp| ~ 4e4 to ~2e-3; relative 1e-7 of the magnitude plus the usual 1e-5.
        check_outputs(outs, refs, kl, atol=1e-5, rtol=2e-7)
        check_grad(gr, gref, torch.float32)
    lp = ops.token_logprobs(x, t, T, backend=backend)
    assert_close(lp, reference.token_logprobs(x.double(), t, T), "token_logprobs", rtol=2e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kl", ["k3", "full"])
def test_neg_inf_entries(backend, kl):
    """-inf logits (banned tokens) are exactly zero-probability: no NaN in outputs or gradients."""
    g = torch.Generator().manual_seed(9)
    V = 700
    x = torch.randn(5, V, generator=g) * 2
    banned = torch.rand(5, V, generator=g) < 0.3
    banned[2, :300] = True                                 # a whole tile of -inf before any finite entry
    banned[3, :] = True
    banned[3, 42] = False                                  # a single allowed token: logp 0, entropy 0
    x[banned] = float("-inf")
    r = x + 0.2 * torch.randn(5, V, generator=g)          # -inf where the actor is -inf (KL stays finite)
    r[banned & (torch.rand(5, V, generator=g) < 0.5)] = float("-inf")
    allowed = [torch.nonzero(~banned[i]).view(-1) for i in range(5)]
    t = torch.stack([allowed[i][-1] for i in range(5)])
    t[4] = IGN
    w = weights(t.shape, seed=10)
    refs, gref = ref_run(x, r, t, 0.9, kl, w)
    outs, gr = op_run(backend, x, r, t, 0.9, kl, w)
    check_outputs(outs, refs, kl)
    assert torch.isfinite(gr).all()
    check_grad(gr, gref, torch.float32)
    assert torch.count_nonzero(gr[banned]) == 0
    assert outs[0][3].item() == 0 and abs(outs[3][3].item()) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows(backend):
    x, r, t = make(shape=(2, 3), V=300, seed=11)
    t.fill_(IGN)
    xg = x.clone().requires_grad_(True)
    outs = ops.logprobs_and_kl(xg, r, t, kl="full", backend=backend)
    for o in outs:
        assert o.dtype == torch.float32 and torch.count_nonzero(o) == 0
    sum(o.sum() for o in outs).backward()
    assert torch.count_nonzero(xg.grad) == 0
    lp = ops.token_logprobs(xg, t, backend=backend)
    assert torch.count_nonzero(lp) == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_and_int32_targets(backend):
    x, r, t = make(shape=(2, 3), V=64, seed=12)
    t = t.masked_fill(t == IGN, 5).to(torch.int32)
    t[0, 0] = -1
    w = weights(t.shape)
    refs, gref = ref_run(x, r, t.long(), 1.0, "k2", w, ignore_index=-1)
    outs, g = op_run(backend, x, r, t, 1.0, "k2", w, ignore_index=-1)
    check_outputs(outs, refs, "k2")
    check_grad(g, gref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_shapes(backend):
    # 1-D logits with a 0-dim target, and zero tokens.
    x = torch.randn(37)
    t = torch.tensor(36)
    lp = ops.token_logprobs(x, t, backend=backend)
    assert lp.shape == () and abs(lp.item() - torch.log_softmax(x.double(), -1)[36].item()) < 1e-5
    e = torch.randn(0, 37, requires_grad=True)
    outs = ops.logprobs_and_kl(e, e.detach(), torch.zeros(0, dtype=torch.long), backend=backend)
    assert all(o.shape == (0,) for o in outs)
    sum(o.sum() for o in outs).backward()
    assert e.grad.shape == (0, 37)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_50257_tiny(backend):
    """GPT-2's odd vocabulary, on two rows (the interpreter runs ~200 tiles per row)."""
    x, r, t = make(shape=(1, 2), V=50257, seed=13, scale=3.0)
    t[0, 0] = 50256
    w = weights(t.shape)
    refs, gref = ref_run(x, r, t, 1.0, "full", w)
    outs, g = op_run(backend, x, r, t, 1.0, "full", w)
    check_outputs(outs, refs, "full")
    check_grad(g, gref, torch.float32)


# -------------------------------------------------------------------------- kernel-level regressions
@needs_interpreter
@pytest.mark.parametrize("V,block_v", [(17, 16), (33, 16), (1000, 128), (5, 16)])
def test_phantom_tokens_launcher(V, block_v):
    """A vocabulary that is not a multiple of the tile: the last tile's spare columns must not count."""
    from hydra_kernels.kernels.triton.logprobs import logprobs_and_kl_backward, logprobs_and_kl_forward
    x, r, t = make(shape=(1, 4), V=V, seed=14)
    t.view(-1)[0] = V - 1
    tt = t.view(-1)
    fwd = logprobs_and_kl_forward(x, r, tt, 1.0, "full", IGN, block_v=block_v, num_warps=1)
    refs = reference.logprobs_and_kl(x.double(), r.double(), t, 1.0, "full")
    for o, q in zip(fwd[:4], refs):
        assert_close(o.view(t.shape), q, f"V={V}")
    gl, gk, gh = (torch.randn(4) for _ in range(3))
    d = logprobs_and_kl_backward(gl, gk, gh, x, r, tt, *fwd, 1.0, "full", IGN, block_v=block_v, num_warps=1)
    xd = x.double().requires_grad_(True)
    o = reference.logprobs_and_kl(xd, r.double(), t, 1.0, "full")
    ((o[0] * gl.view(t.shape)).sum() + (o[2] * gk.view(t.shape)).sum() + (o[3] * gh.view(t.shape)).sum()).backward()
    check_grad(d, xd.grad, torch.float32)


@needs_interpreter
def test_backends_share_the_launcher_contract():
    """Triton and torch produce the same stats, and either backward consumes the other's forward outputs
    (this is the contract the CUDA backend implements too)."""
    from hydra_kernels.kernels.triton import logprobs as tri
    x, r, t = make(shape=(2, 3), V=300, seed=15)
    tt = t.reshape(-1)
    for kl in KLS:
        a = tri.logprobs_and_kl_forward(x, r, tt, 0.8, kl, IGN)
        b = lp_mod._torch_forward(x, r, tt, 0.8, kl, IGN)
        assert [o.shape for o in a] == [o.shape for o in b]
        for oa, ob in zip(a, b):
            torch.testing.assert_close(oa, ob, rtol=1e-5, atol=1e-5)
        grads = [torch.randn(6) for _ in range(3)]
        da = tri.logprobs_and_kl_backward(*grads, x, r, tt, *b, 0.8, kl, IGN)
        db = lp_mod._torch_backward(*grads, x, r, tt, *a, 0.8, kl, IGN)
        torch.testing.assert_close(da, db, rtol=1e-5, atol=1e-7)
    a = tri.logprobs_and_kl_forward(x, None, tt, 1.0, "none", IGN)
    assert a[1].numel() == a[2].numel() == a[3].numel() == 0 and a[4].shape == (6, 4)
    assert torch.count_nonzero(a[4][:, 2:]) == 0


@needs_interpreter
def test_outputs_fully_written(monkeypatch):
    """Poisoned (NaN) buffers are never read back: every output element is written by the kernels."""
    from hydra_kernels.kernels.triton import logprobs as tri
    x, r, t = make(shape=(2, 3), V=100, seed=16)
    orig_empty = torch.empty

    def poisoned_empty(*a, **k):
        out = orig_empty(*a, **k)
        return poison_(out) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", poisoned_empty)
    fwd = tri.logprobs_and_kl_forward(x, r, t.view(-1), 1.0, "k3", IGN)
    d = tri.logprobs_and_kl_backward(torch.ones(6), None, None, x, None, t.view(-1), *fwd, 1.0, "k3", IGN)
    monkeypatch.undo()
    assert all(torch.isfinite(o).all() for o in fwd) and torch.isfinite(d).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_backend_chunks_and_strided_inputs(backend, monkeypatch):
    """Sliced logits (logits[:, :-1]) are read in place; results equal the contiguous ones. Tiny torch
    chunks exercise the per-row-block loop, including blocks that span several sequences."""
    V = 150
    monkeypatch.setattr(lp_mod, "_TORCH_CHUNK_ELEMENTS", 2 * V)
    g = torch.Generator().manual_seed(17)
    full = torch.randn(3, 6, V, generator=g)
    rfull = torch.randn(3, 8, V, generator=g)
    x, r = full[:, :-1], rfull[:, 2:-1]                     # [3, 5, V], different strides
    t = torch.randint(0, V, (3, 5), generator=g)
    t[1, 2] = IGN
    w = weights(t.shape)
    refs, gref = ref_run(x.contiguous(), r.contiguous(), t, 1.1, "full", w)
    outs, g_ = op_run(backend, x, r, t, 1.1, "full", w)
    check_outputs(outs, refs, "full")
    check_grad(g_, gref, torch.float32)
    # Short sequences: one torch chunk holds several of them.
    monkeypatch.setattr(lp_mod, "_TORCH_CHUNK_ELEMENTS", 12 * V)
    outs2, g2 = op_run(backend, x, r, t, 1.1, "full", w)
    check_outputs(outs2, refs, "full")
    check_grad(g2, gref, torch.float32)
    # Vocabulary not unit-stride (copied once) and leading dims that fold into no [B, T] view.
    xt = torch.randn(V, 4, generator=g).t()
    tt = torch.randint(0, V, (4,), generator=g)
    assert_close(ops.token_logprobs(xt, tt, backend=backend), reference.token_logprobs(xt.double(), tt), "xt")
    x4 = torch.randn(2, 3, 4, V, generator=g)[:, ::2, :3]
    t4 = torch.randint(0, V, (2, 2, 3), generator=g)
    assert_close(ops.token_logprobs(x4, t4, backend=backend), reference.token_logprobs(x4.double(), t4), "x4")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ref_logits_never_get_gradient(backend):
    x, r, t = make(shape=(2, 2), V=50, seed=18)
    xg, rg = x.clone().requires_grad_(True), r.clone().requires_grad_(True)
    lp, rlp, k, h = ops.logprobs_and_kl(xg, rg, t, kl="full", backend=backend)
    (lp.sum() + rlp.sum() + k.sum() + h.sum()).backward()
    assert rg.grad is None and xg.grad is not None


# ---------------------------------------------------------------------------------- torch.compile
def _loss_fn(op, backend, T=0.7, kl="k3"):
    def f(x, r, t, w0, w1, w2):
        if op == "token":
            return (ops.token_logprobs(x, t, T, backend=backend) * w0).sum()
        lp, _, k, h = ops.logprobs_and_kl(x, r, t, T, kl, backend=backend)
        return (lp * w0).sum() + (k * w1).sum() + (h * w2).sum()
    return f


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token", "kl"])
def test_compile_fullgraph_matches_eager(backend, op):
    torch._dynamo.reset()
    x, r, t = make(shape=(2, 3), V=100, seed=19)
    w = [wi.float() for wi in weights(t.shape)]
    f = _loss_fn(op, backend)
    xe = x.clone().requires_grad_(True)
    le = f(xe, r, t, *w)
    le.backward()
    xc = x.clone().requires_grad_(True)
    lc = torch.compile(f, backend="aot_eager", fullgraph=True)(xc, r, t, *w)
    lc.backward()
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(xc.grad, xe.grad, rtol=1e-6, atol=1e-7)


def test_compile_inductor_matches_eager():
    """Inductor around the op only (no pointwise code to generate, so no C++ build on CPU): the op and its
    backward must trace, and temperature must stay a Python float inside it."""
    torch._dynamo.reset()
    x, r, t = make(shape=(2, 3), V=64, seed=20)
    w = [wi.float() for wi in weights(t.shape)]

    def f(x, r, t):
        return ops.logprobs_and_kl(x, r, t, 1.3, "full", backend="torch")

    xe = x.clone().requires_grad_(True)
    oe = f(xe, r, t)
    ge = torch.autograd.grad([oe[0], oe[2], oe[3]], xe, grad_outputs=w)[0]
    xc = x.clone().requires_grad_(True)
    oc = torch.compile(f, fullgraph=True)(xc, r, t)
    gc = torch.autograd.grad([oc[0], oc[2], oc[3]], xc, grad_outputs=w)[0]
    for a, b in zip(oc, oe):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gc, ge, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------- bad input
def _bad_cases():
    x = torch.randn(2, 3, 10)
    r = torch.randn(2, 3, 10)
    t = torch.randint(0, 10, (2, 3))
    K = dict(kl="k3")
    return [
        ("logits", lambda: ops.logprobs_and_kl(x.tolist(), r, t)),
        ("logits", lambda: ops.token_logprobs(x.long(), t)),
        ("logits", lambda: ops.token_logprobs(torch.randn(2, 3, 0), t)),
        # Without the interpreter, triton on CPU tensors is refused first (naming backend).
        ("logits" if triton_interpreting() else "backend",
         lambda: ops.token_logprobs(x.double(), t, backend="triton")),
        ("targets", lambda: ops.token_logprobs(x, t.float())),
        ("targets", lambda: ops.token_logprobs(x, t[:, :2])),
        ("targets", lambda: ops.token_logprobs(x, t.masked_fill(t == t[0, 0], 10))),
        ("targets", lambda: ops.logprobs_and_kl(x, r, t.masked_fill(t == t[0, 0], -5), **K)),
        ("targets", lambda: ops.token_logprobs(x, t.to("meta"))),
        ("ref_logits", lambda: ops.logprobs_and_kl(x, None, t)),
        ("ref_logits", lambda: ops.logprobs_and_kl(x, r[:, :2], t)),
        ("ref_logits", lambda: ops.logprobs_and_kl(x, r.bfloat16(), t)),
        ("ref_logits", lambda: ops.logprobs_and_kl(x, r.to("meta"), t)),
        ("kl", lambda: ops.logprobs_and_kl(x, r, t, kl="k4")),
        ("kl", lambda: ops.logprobs_and_kl(x, r, t, kl=None)),
        ("temperature", lambda: ops.token_logprobs(x, t, 0.0)),
        ("temperature", lambda: ops.logprobs_and_kl(x, r, t, -1.0)),
        ("temperature", lambda: ops.token_logprobs(x, t, float("nan"))),
        ("temperature", lambda: ops.token_logprobs(x, t, float("inf"))),
        ("temperature", lambda: ops.token_logprobs(x, t, "hot")),
        ("temperature", lambda: ops.token_logprobs(x, t, torch.tensor(1.0))),
        ("ignore_index", lambda: ops.token_logprobs(x, t, 1.0, -100.0)),
        ("backend", lambda: ops.token_logprobs(x, t, backend="fast")),
        ("backend", lambda: ops.token_logprobs(x, t, backend="cuda")),
    ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_input_raises_value_error_naming_argument(case):
    name, call = _bad_cases()[case]
    with pytest.raises(ValueError, match=rf"^{name}:"):
        call()


# ------------------------------------------------------------------------------ GPU build and runs
_SM90_SCRIPT = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hydra_kernels.kernels.triton import logprobs as tri
target = GPUTarget("cuda", 90, 32)
ints = dict(T_rows="i32", sx_b="i64", sx_t="i32", sr_b="i64", sr_t="i32", V="i32", ignore_index="i32")
fwd = dict(x_ptr="*bf16", r_ptr="*bf16", tgt_ptr="*i64", logp_ptr="*fp32", rlogp_ptr="*fp32", kl_ptr="*fp32",
           ent_ptr="*fp32", stats_ptr="*fp32", **ints, INV_T="constexpr", KL_MODE="constexpr", BLOCK_V="constexpr")
bwd = dict(x_ptr="*bf16", r_ptr="*bf16", tgt_ptr="*i64", dx_ptr="*bf16", glogp_ptr="*fp32", gkl_ptr="*fp32",
           gent_ptr="*fp32", logp_ptr="*fp32", rlogp_ptr="*fp32", kl_ptr="*fp32", ent_ptr="*fp32",
           stats_ptr="*fp32", **ints, INV_T="constexpr", KL_MODE="constexpr", HAS_GLOGP="constexpr",
           HAS_GKL="constexpr", HAS_GENT="constexpr", BLOCK_V="constexpr")
try:
    for mode in range(5):
        c = triton.compile(ASTSource(tri._logprobs_fwd_kernel, signature=fwd,
                                     constexprs=dict(INV_T=1 / 0.7, KL_MODE=mode, BLOCK_V=4096)),
                           target=target, options=dict(num_warps=16))
        assert "ld.local" not in c.asm["ptx"], f"forward kl mode {mode} spills registers"
    for mode, (a, b, h) in [(0, (1, 0, 0)), (1, (1, 1, 0)), (2, (0, 1, 1)), (3, (1, 1, 1)), (4, (1, 1, 1)),
                            (4, (0, 1, 0))]:
        triton.compile(ASTSource(tri._logprobs_bwd_kernel, signature=bwd,
                                 constexprs=dict(INV_T=1.0, KL_MODE=mode, HAS_GLOGP=bool(a), HAS_GKL=bool(b),
                                                 HAS_GENT=bool(h), BLOCK_V=4096)),
                       target=target, options=dict(num_warps=16))
except (RuntimeError, FileNotFoundError) as exc:
    if "ptxas" in str(exc):
        print("SKIP no ptxas:", exc)
        sys.exit(0)
    raise
print("OK")
"""


def test_kernels_compile_for_sm90():
    """Compile every kernel variant to an sm_90 cubin offline (no GPU needed): catches what the
    interpreter accepts but the compiler rejects (non-constexpr globals, loop-carried type changes,
    register spills). Runs in a subprocess because this process has the interpreter switched on."""
    pytest.importorskip("triton.backends.nvidia")
    import os
    import subprocess
    import sys
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    if res.stdout.startswith("SKIP"):
        pytest.skip(res.stdout.strip())
    assert "OK" in res.stdout


def _gpu_backend_or_skip(backend):
    if backend == "cuda":
        from hydra_kernels.kernels import cuda as _cuda
        if not _cuda.is_available():
            pytest.skip(f"cuda backend unavailable: {_cuda.unavailable_reason()}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS + ["cuda"])
def test_gpu_vocab_151936(backend):
    _gpu_backend_or_skip(backend)
    dev = "cuda"
    x, r, t = make(shape=(4, 64), V=151936, dtype=torch.bfloat16, seed=21, scale=3.0)
    x, r, t = x.to(dev), r.to(dev), t.to(dev)
    w = [wi.to(dev) for wi in weights(t.shape)]
    for kl in ("k3", "full"):
        refs, gref = ref_run(x, r, t, 0.9, kl, w)
        outs, g = op_run(backend, x, r, t, 0.9, kl, w)
        check_outputs(outs, refs, kl)
        check_grad(g, gref, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_many_rows(backend):
    """>= 131072 rows (more than 65535 programs on any grid axis but 0), a cheap vocabulary."""
    _gpu_backend_or_skip(backend)
    dev = "cuda"
    x, r, t = make(shape=(2, 65540), V=1000, dtype=torch.bfloat16, seed=22)
    x, r, t = x.to(dev), r.to(dev), t.to(dev)
    w = [wi.to(dev) for wi in weights(t.shape)]
    refs, gref = ref_run(x, r, t, 1.0, "full", w)
    outs, g = op_run(backend, x, r, t, 1.0, "full", w)
    check_outputs(outs, refs, "full")
    check_grad(g, gref, torch.bfloat16)
    lp = ops.token_logprobs(x, t, backend=backend)
    assert_close(lp, refs[0], "token_logprobs")


@pytest.mark.gpu
def test_gpu_compile_inductor_triton():
    torch._dynamo.reset()
    x, r, t = make(shape=(4, 256), V=32000, dtype=torch.bfloat16, seed=23)
    x, r, t = x.cuda(), r.cuda(), t.cuda()
    w = [wi.float().cuda() for wi in weights(t.shape)]
    f = _loss_fn("kl", "triton", T=0.7, kl="full")
    xe = x.clone().requires_grad_(True)
    f(xe, r, t, *w).backward()
    xc = x.clone().requires_grad_(True)
    torch.compile(f, fullgraph=True)(xc, r, t, *w).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


# ------------------------------------------------------------------------------------------- bench
def test_bench_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_logprobs", ROOT / "bench" / "bench_logprobs.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rc = bench.main(["--smoke", "--section", "logits", "--out", str(tmp_path)])
    assert rc == 0
    js = list(tmp_path.glob("*.json"))
    md = list(tmp_path.glob("*.md"))
    assert len(js) == 1 and len(md) == 1
    import json
    data = json.loads(js[0].read_text())
    assert data["results"] and all(math.isfinite(row["ms"]) for row in data["results"])
