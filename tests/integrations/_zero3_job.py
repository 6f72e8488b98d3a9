"""Run under torchrun (2 processes, gloo, DS_ACCELERATOR=cpu): a HydraModel in a DeepSpeed ZeRO-3 engine against
one process.

argv[1]: a directory shared by the ranks. Each rank builds the same model twice: one copy stays a plain reference,
as one process has it (rank 0 writes its files; it runs the whole batch), the other goes into a ZeRO-3 engine
(every parameter partitioned across the ranks) and runs this rank's half of the batch. Checked: save_pretrained,
merge (the actor merged; the base as it is, tied embeddings included) and export_peft write the same tensors and
JSON as the reference; a write that fails on rank 0 raises on every rank; loading into a partitioned model is
refused (ValueError); an op given the partitioned LM head directly raises ValueError naming it; the gradients of a
streams forward + backward (fused log-probs with the KL through the LM head, value and reward heads; an untied and
a tied LM head) at each of three SGD steps, and the trainable parameters after them (full_tensor,
full_state_dict), equal the reference's; then no-grad scoring and greedy generation (HydraModel's and the
rollout's decoder) do too, and saving the trained model (save_pretrained, merge) writes its tensors. Prints "ZERO3
OK" at the end.
"""
import datetime
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import load_file

from hydra_kernels import ops
from hydra_kernels.integrations.fsdp import full_state_dict, full_tensor, is_zero3
from hydra_kernels.rlhf.models import PolicyHandle
from hydra_kernels.rlhf.rollout import generate
from tests.integrations._fsdp_job import B, batch, build, loss_of
from tests.integrations._fsdp_save_job import (merge_into_foreign_dir_fails_everywhere, save_like_one_process,
                                               tied_hydra)

TOL = 2e-5                                               # max |Δ| / max |ref|, fp32 (reduction order differs)
LR, STEPS = 0.1, 3


def engine_of(hydra):
    params = [p for p in hydra.parameters() if p.requires_grad]
    # DeepSpeed clips gradients to norm 1.0 unless told otherwise; the reference does not clip.
    config = {"train_micro_batch_size_per_gpu": B // dist.get_world_size(), "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0}
    engine, *_ = deepspeed.initialize(model=hydra, optimizer=torch.optim.SGD(params, lr=LR), config=config)
    assert all(is_zero3(p) and p.numel() == 0 for p in hydra.parameters()), "ZeRO-3 left a parameter whole"
    return engine


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def check_saving(root: Path, rank: int):
    for tag, make in (("llama", build), ("qwen2-tied", tied_hydra)):
        ref, zero = make(), make()
        engine_of(zero)
        got = root / tag / "zero3"
        save_like_one_process(ref, zero, root / tag / "ref", got, rank)
    merge_into_foreign_dir_fails_everywhere(zero, root / "users-own", rank)
    try:                                                 # loading goes before deepspeed.initialize
        zero.load_adapters(got / "hydra")
    except ValueError as e:
        assert "ZeRO-3" in str(e) and "initialize" in str(e), e
    else:
        raise AssertionError("load_adapters into a ZeRO-3 model did not raise")


def check_training(rank: int, world: int, make=build):
    ref, zero = make(), make()
    engine = engine_of(zero)
    ids, mask = batch()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    h = zero.forward_streams(ids[rows], mask[rows], ("base", "actor"))
    try:
        ops.linear_logprobs(h[1], zero.lm_head_weight, ids[rows])
    except ValueError as e:
        assert "weight" in str(e) and "ZeRO-3" in str(e), e
    else:
        raise AssertionError("the partitioned LM head passed straight to an op did not raise")
    ref_opt = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=LR)
    trainable = [(n, p) for n, p in zero.named_parameters() if p.requires_grad]
    want = dict(ref.named_parameters())
    for step in range(STEPS):
        ref_opt.zero_grad()
        loss_of(ref, ids, mask).backward()
        engine.backward(loss_of(zero, ids[rows], mask[rows]))    # ZeRO-3 averages the ranks' gradients
        for n, p in trainable:
            err = rel(safe_get_full_grad(p), want[n].grad)         # collective: every rank, same order
            assert err <= TOL, (n, "step", step, err)
        engine.step()
        ref_opt.step()
    for n, p in trainable:
        err = rel(full_tensor(p), want[n].detach())
        assert err <= TOL, (n, "after steps", err)
    # What a training checkpoint takes (rlhf.checkpoint): the whole trainable tensors, on every rank.
    state = full_state_dict(dict(trainable))
    assert all(rel(state[n], want[n].detach()) <= TOL for n, _ in trainable)
    return ref, zero


def check_inference(ref, zero, rank: int):
    """No-grad scoring (lm_logits, logprobs, the heads) and greedy generation (HydraModel.generate, the
    rollout's decoder with its LM head read outside the module) on the whole batch, as one process."""
    ids, mask = batch()
    with torch.no_grad():
        hz, hr = zero.forward_streams(ids, mask), ref.forward_streams(ids, mask)
        assert rel(hz, hr) <= TOL
        assert rel(zero.lm_logits(hz[1]), ref.lm_logits(hr[1])) <= TOL
        lz, lr = zero.logprobs(hz[:2, :, :-1], ids[:, 1:], kl="k3"), ref.logprobs(hr[:2, :, :-1], ids[:, 1:], kl="k3")
        assert all(rel(a, b) <= TOL for a, b in zip(lz, lr))
        assert rel(zero.values(hz[2]), ref.values(hr[2])) <= TOL
        assert rel(zero.reward(hz[0], mask), ref.reward(hr[0], mask)) <= TOL
    want = ref.generate(ids, mask, stream="actor", max_new_tokens=3, do_sample=False, pad_token_id=0)
    got = zero.generate(ids, mask, stream="actor", max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(want, got), (want, got)
    kw = dict(max_new_tokens=3, eos_token_id=1, pad_token_id=0, temperature=0.0)
    ro_ref = generate(PolicyHandle(ref.model, "critic"), ids, mask, **kw)
    ro = generate(PolicyHandle(zero.model, "critic"), ids, mask, **kw)
    assert torch.equal(ro.response_ids, ro_ref.response_ids)


def check_saving_after_training(ref, zero, root: Path, rank: int):
    """Saving once the engine has run forwards (ZeRO-3 then keeps small parameters gathered for good): the
    files hold the trained tensors, as one process's within TOL."""
    want, got = root / "trained" / "ref", root / "trained" / "zero3"
    if rank == 0:
        ref.save_pretrained(want / "hydra")
        ref.merge("actor", want / "merged")
    zero.save_pretrained(got / "hydra")
    zero.merge("actor", got / "merged")
    dist.barrier()
    if rank == 0:
        for what, name in (("hydra", "hydra_model.safetensors"), ("merged", "model.safetensors")):
            x, y = load_file(str(want / what / name)), load_file(str(got / what / name))
            assert x.keys() == y.keys(), what
            for k in x:
                assert rel(y[k], x[k]) <= TOL, (what, k, rel(y[k], x[k]))


def main():
    # A short timeout: a rank that fails makes the others fail instead of waiting half an hour.
    deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    check_saving(Path(sys.argv[1]), rank)
    check_training(rank, world, tied_hydra)                   # the LM head is the input embedding
    ref, zero = check_training(rank, world)
    check_inference(ref, zero, rank)
    check_saving_after_training(ref, zero, Path(sys.argv[1]), rank)
    dist.barrier()
    print(f"rank {rank}: saving, gradients and steps under ZeRO-3 equal one process; ZERO3 OK", flush=True)


if __name__ == "__main__":
    main()
