"""Run under torchrun (2 processes, gloo): PPO's per-role optimizer features on FSDP2-sharded parameters.

Each rank keeps an unsharded copy of the model as the single-process reference (run on the whole batch) and
shards another (integrations.fsdp.shard) that runs its half. With Hydra-PPO's roles (the actor's and the
critic's slices of every stacked LoRA parameter; the value head the critic's), clip_grad_norm_per_role gives
the same norms and clipped gradients, and build_ppo_optimizer with critic_lr the same parameters after two
steps, as one process; the steps differ from those with critic_lr = lr (the feature acts). Prints "OPTIM OK".
"""
import datetime
from types import SimpleNamespace

import torch
import torch.distributed as dist

from hydra_kernels.integrations.fsdp import full_optimizer_state, full_tensor, load_full_, load_optimizer_state_, shard
from hydra_kernels.rlhf.optim import build_ppo_optimizer, clip_grad_norm_per_role
from tests.integrations._fsdp_job import B, batch, build, loss_of, rel


def roles_of(hydra):
    """Hydra-PPO's roles (rlhf.variants.HydraPPO.roles): slice 0 of each stack the actor's, 1 the critic's."""
    stacks = hydra.lora_parameters()
    return {"actor": [(p, 0) for p in stacks],
            "critic": [(p, 1) for p in stacks] + [(p, None) for p in hydra.value_head.parameters()]}


def optimizer_of(hydra, critic_lr):
    return build_ppo_optimizer(roles_of(hydra), SimpleNamespace(lr=1e-2, critic_lr=critic_lr, weight_decay=0.01))


def steps(hydra, opt, ids, mask, n=2):
    roles = roles_of(hydra)
    norms = []
    for _ in range(n):
        opt.zero_grad()
        loss_of(hydra, ids, mask).backward()
        norms.append({k: float(v) for k, v in clip_grad_norm_per_role(roles, 1e-2).items()})
        opt.step()
    return norms


def trained(hydra):
    return {n: full_tensor(p.detach()) for n, p in hydra.named_parameters() if p.requires_grad}


def run(hydra, ids, mask, critic_lr):
    opt = optimizer_of(hydra, critic_lr)
    return steps(hydra, opt, ids, mask), trained(hydra), opt


def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, mask = batch()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    ref_model, model = build(), shard(build())
    norms_ref, ref, ref_opt = run(ref_model, ids, mask, critic_lr=1e-3)
    norms, got, opt = run(model, ids[rows], mask[rows], critic_lr=1e-3)
    _, same_lr, _ = run(build(), ids, mask, critic_lr=1e-2)
    for want, have in zip(norms_ref, norms):
        assert set(want) == set(have) == {"actor", "critic"}, (want, have)
        for role in want:
            assert abs(have[role] - want[role]) <= 1e-5 * want[role], (role, have[role], want[role])
            assert want[role] > 1e-2                      # the clipping acts: every role's norm is above max_norm
    worst = max(rel(got[n], ref[n]) for n in ref)
    assert worst < 1e-5, worst
    # critic_lr acts: the critic's slices and the value head moved otherwise than with critic_lr = lr.
    stack = "model.model.layers.0.self_attn.q_proj.lora_A"
    assert rel(ref[stack][1], same_lr[stack][1]) > 1e-3 and rel(ref[stack][0], same_lr[stack][0]) < 1e-6
    assert rel(ref["value_head.weight"], same_lr["value_head.weight"]) > 1e-3
    # The optimizer state a checkpoint takes: gathered, it equals one process's; loaded into a fresh sharded
    # model (parameters copied in by load_full_), the next step equals one process continuing.
    full, want = full_optimizer_state(opt), ref_opt.state_dict()
    assert full["state"].keys() == want["state"].keys()
    for i in want["state"]:
        for k, v in want["state"][i].items():
            assert (rel(full["state"][i][k], v) < 1e-5) if v.dim() else torch.equal(full["state"][i][k], v), (i, k)
    resumed = shard(build())
    for n, p in resumed.named_parameters():
        if p.requires_grad:
            load_full_(p, got[n])
    resumed_opt = optimizer_of(resumed, critic_lr=1e-3)
    load_optimizer_state_(resumed_opt, full)
    steps(ref_model, ref_opt, ids, mask, n=1)
    steps(resumed, resumed_opt, ids[rows], mask[rows], n=1)
    after, after_ref = trained(resumed), trained(ref_model)
    resumed_worst = max(rel(after[n], after_ref[n]) for n in after_ref)
    assert resumed_worst < 1e-5, resumed_worst
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: per-role clipping and critic_lr under FSDP2 match one process (worst {worst:.2e}); "
          "OPTIM OK", flush=True)


if __name__ == "__main__":
    main()
