"""Run under torchrun (2 processes, gloo): FSDP2 (integrations.fsdp.shard) against one process.

Each rank builds the same model, keeps an unsharded copy as the single-process reference (run on the whole
batch), shards the other and runs its own half of the batch. Checked: the gradients of one streams
forward + backward (base / actor / critic streams, fused log-probs with the KL, value and reward heads) in
fp32, with a bf16 base (fp32 adapter gradients) and with activation checkpointing; the no-grad scoring path,
one optimizer step, greedy generation (HydraModel.generate and the rollout's decoder; compiled decoding is
refused), a plain patched causal LM (decoder_forward + fp32 logits), the ValueError an op gives for a
parameter FSDP has not gathered, and a gathered call that raises midway leaving FSDP usable. Prints "FSDP OK" at the end.
"""
import copy
import datetime
import sys

import torch
import torch.distributed as dist

from hydra_kernels.integrations import HydraModel, patch_model
from hydra_kernels.integrations.fsdp import full_tensor, gathered_call, is_sharded, shard
from hydra_kernels.rlhf.models import PolicyHandle
from hydra_kernels.rlhf.rollout import generate
from hydra_kernels.rlhf.scoring import logits_f32
from tests.rlhf._tiny import tiny_model

VOCAB, B, T = 23, 4, 6
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-5}      # max |Δ| / max |ref| of fp32 gradients


def rel(a, b):
    a, b = full_tensor(a).double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def build(seed=0):
    torch.manual_seed(seed)                              # the heads' init draws from the global generator
    hydra = HydraModel.from_pretrained_base(tiny_model(VOCAB, seed=seed), adapters=("actor", "critic"), r=4, alpha=8)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():                                # distinct adapters, so every stream differs
        for p in hydra.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return hydra


def batch():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :2] = 0
    mask[3, :1] = 0
    return ids, mask


def loss_of(hydra, ids, mask):
    h = hydra.forward_streams(ids, mask, ("base", "actor", "critic"))
    logp, ent, kl = hydra.logprobs([h[1, :, :-1], h[0, :, :-1]], ids[:, 1:], kl="k3")
    values = hydra.values(h[2])
    reward = hydra.reward(h[0], mask)
    return logp[0].mean() + 0.5 * logp[1].mean() + kl.mean() + ent.mean() + values.mean() + reward.mean()


def grads(hydra):
    return {n: p.grad for n, p in hydra.named_parameters() if p.requires_grad}


def check_streams(dtype, rank, world, checkpointing=False):
    ref = build()
    if dtype != torch.float32:                           # what shard(mixed_precision=dtype) stores: frozen base only
        with torch.no_grad():
            for p in ref.model.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(dtype)
    sharded = build()
    if checkpointing:                                    # recomputed layers: FSDP re-gathers before recomputing
        ref.enable_activation_checkpointing()
        sharded.enable_activation_checkpointing()
    shard(sharded, mixed_precision=None if dtype == torch.float32 else dtype)
    ids, mask = batch()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    loss_of(ref, ids, mask).backward()
    loss_of(sharded, ids[rows], mask[rows]).backward()
    want, got = grads(ref), grads(sharded)
    assert set(want) == set(got) and want, (sorted(want), sorted(got))
    worst = 0.0
    for name in want:
        assert got[name] is not None, name
        assert full_tensor(got[name]).dtype == want[name].dtype == torch.float32, name
        err = rel(got[name], want[name])
        worst = max(worst, err)
        assert err <= TOL[dtype], f"{dtype}: gradient of {name}: relative error {err:.3g}"
    how = " with activation checkpointing" if checkpointing else ""
    print(f"rank {rank}: {dtype} streams gradients{how} match one process (worst {worst:.2e})", flush=True)
    return ref, sharded, ids, mask


def check_scoring_and_step(ref, sharded, ids, mask, rank):
    with torch.no_grad():
        for model in (ref, sharded):
            h = model.forward_streams(ids, mask, ("base", "actor"))
            model.scored = model.logprobs([h[1, :, :-1], h[0, :, :-1]], ids[:, 1:], kl="k3"), model.reward(h[0], mask)
    (lw, _, kw), rw = ref.scored
    (lg, _, kg), rg = sharded.scored
    assert rel(lg, lw) < 1e-5 and rel(kg, kw) < 1e-5 and rel(rg, rw) < 1e-5
    # One optimizer step on the sharded parameters equals the same step on one process.
    for model in (ref, sharded):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        opt.step()
    with torch.no_grad():
        after_ref = ref.forward_streams(ids, mask, ("actor", "critic"))
        after = sharded.forward_streams(ids, mask, ("actor", "critic"))
        assert rel(after, after_ref) < 1e-5, rel(after, after_ref)
        assert rel(sharded.values(after[1]), ref.values(after_ref[1])) < 1e-5
    print(f"rank {rank}: no-grad scoring and one AdamW step match one process", flush=True)


def check_generation(ref, sharded, ids, mask, rank):
    want = ref.generate(ids, mask, stream="actor", max_new_tokens=3, do_sample=False, pad_token_id=0)
    got = sharded.generate(ids, mask, stream="actor", max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(want, got), (want, got)
    kw = dict(max_new_tokens=3, eos_token_id=1, pad_token_id=0, temperature=0.0)
    ro_ref = generate(PolicyHandle(ref.model, "critic"), ids, mask, **kw)
    ro = generate(PolicyHandle(sharded.model, "critic"), ids, mask, **kw)
    assert torch.equal(ro.response_ids, ro_ref.response_ids)
    try:
        generate(PolicyHandle(sharded.model, "critic"), ids, mask, compile=True, **kw)
    except ValueError as e:
        assert "compile" in str(e), e
    else:
        raise AssertionError("compiled decoding of a sharded model did not raise")
    print(f"rank {rank}: generate and the rollout decoder match one process", flush=True)


def check_plain_model(rank, world):
    from hydra_kernels.integrations import decoder_forward
    models = []
    for _ in range(2):
        m = patch_model(tiny_model(VOCAB, seed=3), adapters=("actor",), r=4, alpha=8)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        models.append(m)
    ref, sharded = models[0], shard(models[1])
    ids, mask = batch()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    for model, i, m in ((ref, ids, mask), (sharded, ids[rows], mask[rows])):
        h, _ = decoder_forward(model, i, m, streams=("actor",))
        logits_f32(model, h[0]).log_softmax(-1).mean().backward()
    for (name, p), q in zip(ref.named_parameters(), sharded.parameters()):
        if p.requires_grad:
            assert rel(q.grad, p.grad) < 2e-5, name
    print(f"rank {rank}: a plain patched causal LM matches one process", flush=True)


def check_ungathered_op(sharded, rank):
    layer = sharded.model.model.layers[0].self_attn.q_proj
    try:
        layer(torch.randn(2, layer.in_features))
    except ValueError as e:
        assert "DTensor" in str(e) and "weight" in str(e), e
    else:
        raise AssertionError("an op on an ungathered FSDP parameter did not raise")
    # The LM head's ops, handed the root's weight outside a gathered call (the fp32 logits of sampling and
    # scoring, the fused log-probs of scoring, the update and Hydra-SFT).
    from hydra_kernels.ops import linear_logprobs
    from hydra_kernels.ops.matmul import linear_f32
    w = sharded.lm_head_weight
    h = torch.randn(1, 3, w.shape[1])
    for name, call in (("linear_f32", lambda: linear_f32(h[0], w)),
                       ("linear_logprobs", lambda: linear_logprobs(h, w, torch.zeros(3, dtype=torch.long)))):
        try:
            call()
        except ValueError as e:
            assert "DTensor" in str(e) and "weight" in str(e), (name, e)
        else:
            raise AssertionError(f"{name} on an ungathered LM head did not raise")
    print(f"rank {rank}: an op on an ungathered parameter raises ValueError", flush=True)


def check_reset_on_error(ref, sharded, ids, mask, rank):
    """A gathered call that raises midway (after the decoder ran) leaves every parameter its shard again, and
    the next call gives the single-process result."""
    def fail():
        sharded.forward_streams(ids, mask, ("actor",))
        raise RuntimeError("midway")
    try:
        with torch.no_grad():
            gathered_call(sharded, fail)
    except RuntimeError as e:
        assert "midway" in str(e), e
    else:
        raise AssertionError("the failing call did not raise")
    assert all(is_sharded(p) for p in sharded.parameters())
    with torch.no_grad():
        got, want = sharded.forward_streams(ids, mask, ("actor",)), ref.forward_streams(ids, mask, ("actor",))
    assert rel(got, want) < 1e-5, rel(got, want)
    print(f"rank {rank}: a gathered call that raised left FSDP usable", flush=True)


def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    ref, sharded, ids, mask = check_streams(torch.float32, rank, world)
    check_scoring_and_step(ref, sharded, ids, mask, rank)
    check_generation(ref, sharded, ids, mask, rank)
    check_ungathered_op(sharded, rank)
    check_reset_on_error(ref, sharded, ids, mask, rank)
    check_streams(torch.bfloat16, rank, world)
    check_streams(torch.float32, rank, world, checkpointing=True)
    check_plain_model(rank, world)
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: FSDP OK", flush=True)


if __name__ == "__main__":
    sys.exit(main())
