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


def test_clip_grad_norm_per_role_with_stack_slices():
    from hydra_kernels.rlhf.optim import clip_grad_norm_per_role
    stack = torch.nn.Parameter(torch.zeros(2, 3))
    head = torch.nn.Parameter(torch.zeros(4))
    stack.grad = torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.3, 0.4]])      # actor slice norm 5, critic slice 0.5
    head.grad = torch.tensor([1.2, 0.0, 0.0, 0.0])                     # critic total: sqrt(0.25 + 1.44) = 1.3
    norms = clip_grad_norm_per_role({"actor": [(stack, 0)], "critic": [(stack, 1), (head, None)]}, 1.0)
    torch.testing.assert_close(norms["actor"], torch.tensor(5.0))
    torch.testing.assert_close(norms["critic"], torch.tensor(1.3))
    torch.testing.assert_close(stack.grad[0], torch.tensor([3.0, 0.0, 4.0]) / (5.0 + 1e-6))
    torch.testing.assert_close(stack.grad[1], torch.tensor([0.0, 0.3, 0.4]) / (1.3 + 1e-6))
    torch.testing.assert_close(head.grad, torch.tensor([1.2, 0.0, 0.0, 0.0]) / (1.3 + 1e-6))
    norms = clip_grad_norm_per_role({"actor": [(stack, 0)]}, 10.0)     # below the bound: untouched
    torch.testing.assert_close(stack.grad[0], torch.tensor([3.0, 0.0, 4.0]) / (5.0 + 1e-6))


@pytest.mark.parametrize("per_role", [True, False])
def test_per_role_clipping_keeps_the_actor_step_independent_of_the_value_loss(tmp_path, monkeypatch, per_role):
    """Hydra: the actor's raw gradients do not depend on vf_coef; clipped per role they still do not, clipped
    jointly (TRL's way) a large value loss shrinks them."""
    from hydra_kernels.rlhf.optim import SlicedLRAdamW
    from tests.rlhf._ppo_job import run

    def actor_grads(vf_coef):
        seen = []
        real = SlicedLRAdamW.step

        def spy(self, closure=None):
            if not seen:                                   # the first minibatch update
                seen.append([p.grad[0].clone() for p in self.param_groups[0]["params"] if p.dim() == 3])
            return real(self, closure)
        monkeypatch.setattr(SlicedLRAdamW, "step", spy)
        run(tmp_path / f"vf{vf_coef}", ["steps=1", "max_grad_norm=0.001", f"vf_coef={vf_coef}",
                                        f"clip_grad_per_role={str(per_role).lower()}", "run.checkpoint_every=0"])
        monkeypatch.setattr(SlicedLRAdamW, "step", real)
        return seen[0]
    small, large = actor_grads(0.1), actor_grads(10.0)
    same = all(torch.equal(a, b) for a, b in zip(small, large))
    assert same == per_role


@pytest.mark.parametrize("variant", ["hydra", "j-hydra", "lora", "full"])
def test_per_role_clipping_runs_every_variant(tmp_path, variant):
    from tests.rlhf._ppo_job import run
    _, res = run(tmp_path, [f"variant={variant}", "steps=1", "clip_grad_per_role=true", "run.checkpoint_every=0"])
    h = res.history[0]
    assert h["policy/grad_norm"] > 0 and h["val/grad_norm"] > 0


def test_the_ppo_optimizer_is_fused_on_cuda_and_a_for_loop_elsewhere():
    """Fused on CUDA; elsewhere no foreach step, whose temporaries hold all trainable parameters at once."""
    from types import SimpleNamespace
    from hydra_kernels.rlhf.optim import adamw_implementation, build_ppo_optimizer
    assert adamw_implementation(torch.device("cuda", 0)) == {"fused": True, "foreach": False}
    assert adamw_implementation(torch.device("cpu")) == {"fused": False, "foreach": False}
    assert adamw_implementation(torch.device("meta")) == {"fused": False, "foreach": False}
    stack, head = torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4))
    cfg = SimpleNamespace(lr=1e-3, critic_lr=None, weight_decay=0.0)
    opt = build_ppo_optimizer({"actor": [(stack, 0)], "critic": [(stack, 1), (head, None)]}, cfg)
    assert all(g["fused"] is False and g["foreach"] is False for g in opt.param_groups)


@pytest.mark.parametrize("impl", [{"fused": False, "foreach": False}, {"fused": True, "foreach": False}])
def test_the_new_implementations_give_the_old_optimizers_numbers(impl):
    """Against the old optimizer (torch's default, the foreach step on an accelerator): the for-loop step is
    bitwise the same on a CPU, the fused one (CUDA's; torch has a CPU kernel too) equal to fp32 rounding."""
    g = torch.Generator().manual_seed(3)
    init = [torch.randn(2, 5, 7, generator=g), torch.randn(4, generator=g)]
    new = [torch.nn.Parameter(t.clone()) for t in init]
    old = [torch.nn.Parameter(t.clone()) for t in init]
    kw = dict(lr=1e-2, weight_decay=0.1)
    opt_new = SlicedLRAdamW([{"params": new}], slice_ratios=[(new[0], 1, 0.5)], **kw, **impl)
    opt_old = SlicedLRAdamW([{"params": old}], slice_ratios=[(old[0], 1, 0.5)], foreach=True, **kw)
    for step in range(5):
        grads = [x.float() for x in _grads(step, [(2, 5, 7), (4,)])]
        for p, q, gr in zip(new, old, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        opt_new.step()
        opt_old.step()
    for p, q in zip(new, old):
        if impl["fused"]:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(p, q)


def test_a_loaded_state_keeps_this_optimizers_implementation():
    """A checkpoint of the old (foreach) optimizer resumes on the for-loop one, same moments and steps."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    old = SlicedLRAdamW([a], lr=1e-2, foreach=True)
    a.grad = torch.full((3,), 0.5)
    old.step()
    new = SlicedLRAdamW([b], lr=1e-2, fused=False, foreach=False)
    new.load_state_dict(old.state_dict())
    assert new.param_groups[0]["foreach"] is False and new.param_groups[0]["fused"] is False
    assert torch.equal(new.state[b]["exp_avg"], old.state[a]["exp_avg"])
    assert float(new.state[b]["step"]) == 1.0


def test_per_role_lr_and_clipping_act_on_fsdp2_shards():
    # 2 gloo processes: critic_lr and clip_grad_norm_per_role on sharded parameters = one process.
    from pathlib import Path

    from tests._util import torchrun
    out = torchrun(Path(__file__).with_name("_fsdp_optim_job.py"), 2, timeout=240)
    assert out.count("OPTIM OK") == 2, out
