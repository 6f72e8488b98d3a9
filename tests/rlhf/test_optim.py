"""SlicedLRAdamW (per-adapter learning rates inside Hydra's stacked LoRA parameters) against separate AdamWs."""
import pytest
import torch

from hydra_kernels.rlhf.optim import SlicedLRAdamW


def _grads(step, shapes):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]


@pytest.mark.parametrize("ratio", (0.0, 0.25, 3.0))
def test_slice_moves_like_its_own_adamw(ratio):
    g = torch.Generator().manual_seed(0)
    stacked = torch.nn.Parameter(torch.randn(3, 5, 7, generator=g, dtype=torch.float64))
    other = torch.nn.Parameter(torch.randn(4, generator=g, dtype=torch.float64))
    lr, wd = 1e-2, 0.1
    opt = SlicedLRAdamW([{"params": [stacked, other]}], lr=lr, weight_decay=wd, slice_ratios=[(stacked, 1, ratio)])
    # The truth: every slice its own Parameter, slice 1 with lr * ratio.
    parts = [torch.nn.Parameter(stacked[i].detach().clone()) for i in range(3)]
    other_ref = torch.nn.Parameter(other.detach().clone())
    ref = torch.optim.AdamW([{"params": [parts[0], parts[2], other_ref]},
                             {"params": [parts[1]], "lr": lr * ratio}], lr=lr, weight_decay=wd)
    for step in range(6):
        gs, go = _grads(step, [(3, 5, 7), (4,)])
        stacked.grad, other.grad = gs.clone(), go.clone()
        for i in range(3):
            parts[i].grad = gs[i].clone()
        other_ref.grad = go.clone()
        opt.step()
        ref.step()
    for i in range(3):
        torch.testing.assert_close(stacked[i], parts[i], rtol=1e-12, atol=1e-14)
    assert torch.equal(other, other_ref)
    if ratio == 0.0:
        assert torch.equal(stacked[1], parts[1])      # frozen exactly, not approximately


def test_ratio_one_and_no_slices_are_plain_adamw_bitwise():
    g = torch.Generator().manual_seed(1)
    init = torch.randn(2, 3, 4, generator=g)
    a, b = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_a = SlicedLRAdamW([a], lr=1e-3, weight_decay=0.01, slice_ratios=[(a, 0, 1.0)])
    opt_b = torch.optim.AdamW([b], lr=1e-3, weight_decay=0.01)
    assert opt_a.slice_ratios == []
    for step in range(3):
        a.grad = b.grad = _grads(step, [(2, 3, 4)])[0].float()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_bf16_slice_stays_bf16_and_close():
    # Entries in [0.5, 1): one bf16 ulp is 2^-8; Adam's first step moves every entry by lr (sign of the grad).
    p = torch.nn.Parameter((0.5 + 0.4 * torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(2))).bfloat16())
    opt = SlicedLRAdamW([p], lr=1e-2, slice_ratios=[(p, 1, 0.5)])
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    assert p.dtype == torch.bfloat16
    moved0, moved1 = (p[0].float() - before[0].float()), (p[1].float() - before[1].float())
    torch.testing.assert_close(moved1, torch.full_like(moved1, -0.005), rtol=0, atol=2 ** -8)
    torch.testing.assert_close(moved0, torch.full_like(moved0, -0.01), rtol=0, atol=2 ** -8)


def test_bad_slices_name_the_argument():
    p, q = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="slice_ratios: a parameter"):
        SlicedLRAdamW([p], lr=1e-3, slice_ratios=[(q, 0, 0.5)])
    with pytest.raises(ValueError, match="slice_ratios: index 2"):
        SlicedLRAdamW([p], lr=1e-3, slice_ratios=[(p, 2, 0.5)])
    with pytest.raises(ValueError, match="slice_ratios: ratio"):
        SlicedLRAdamW([p], lr=1e-3, slice_ratios=[(p, 0, -1.0)])
