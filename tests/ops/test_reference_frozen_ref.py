"""Autograd through reference.py gives the ops' gradients, the frozen reference included.

The reference side is a constant of the KL: ops.logprobs_and_kl never sends a gradient to ref_logits, and
ops.linear_logprobs sends KL's gradient to stream 0 only (stream 1 gets its own logp/entropy gradients). The
references must agree even when the reference side requires grad.
"""
import pytest
import torch

from hydra_kernels import ops, reference
from tests._util import assert_rel_close

KLS = list(ops.KL_ESTIMATORS)


@pytest.mark.parametrize("kl", KLS)
def test_reference_logprobs_and_kl_sends_no_gradient_to_ref_logits(kl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    r = (x + 0.3 * torch.randn(3, 5, 11, generator=g, dtype=torch.float64)).requires_grad_(True)
    t = torch.randint(0, 11, (3, 5), generator=g)
    t[0, 1] = -100
    xd = x.clone().requires_grad_(True)
    lp, rlp, k, h = reference.logprobs_and_kl(xd, r, t, 0.7, kl)
    w = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(4)]
    loss = sum((o * wi).sum() for o, wi in zip((lp, rlp, k, h), w))
    assert not rlp.requires_grad
    loss.backward()
    assert r.grad is None
    # ... and the logits' gradient is the op's (float64 logits; the op's outputs are fp32).
    xo = x.clone().requires_grad_(True)
    outs = ops.logprobs_and_kl(xo, r, t, 0.7, kl, backend="torch")
    sum((o * wi).sum() for o, wi in zip(outs, w)).backward()
    assert_rel_close(xo.grad, xd.grad, torch.float32, "dlogits")


@pytest.mark.parametrize("kl", KLS)
def test_reference_linear_logprobs_kl_gradient_reaches_stream_0_only(kl):
    g = torch.Generator().manual_seed(1)
    S, T, D, V = 3, 6, 8, 13
    base = torch.randn(T, D, generator=g)
    h = torch.stack([base + 0.3 * torch.randn(T, D, generator=g) for _ in range(S)])
    w = torch.randn(V, D, generator=g) / D ** 0.5 * 2
    tg = torch.randint(0, V, (T,), generator=g)
    tg[2] = -100
    g_lp, g_ent, g_kl = torch.randn(S, T, generator=g), torch.randn(S, T, generator=g), torch.randn(T, generator=g)

    hd, wd = h.double().requires_grad_(True), w.double().requires_grad_(True)
    lp, ent, k = reference.linear_logprobs(hd, wd, tg, 0.7, kl)
    ((lp * g_lp).sum() + (ent * g_ent).sum() + (k * g_kl).sum()).backward()

    hf, wf = h.clone().requires_grad_(True), w.clone().requires_grad_(True)      # one [S, T, D] tensor
    lp, ent, k = ops.linear_logprobs(hf, wf, tg, 0.7, kl, backend="torch")
    ((lp * g_lp).sum() + (ent * g_ent).sum() + (k * g_kl).sum()).backward()
    for s in range(S):
        assert_rel_close(hf.grad[s], hd.grad[s], torch.float32, f"dhidden[{s}]")
    assert_rel_close(wf.grad, wd.grad, torch.float32, "dweight")
