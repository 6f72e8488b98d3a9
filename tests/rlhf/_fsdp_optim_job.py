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

from hydra_kernels.integrations.fsdp import full_tensor, shard
from hydra_kernels.rlhf.optim import build_ppo_optimizer, clip_grad_norm_per_role
from tests.integrations._fsdp_job import B, batch, build, loss_of, rel


def roles_of(hydra):
    """Hydra-PPO's roles (rlhf.variants.HydraPPO.roles): slice 0 of each stack the actor's, 1 the critic's."""
    stacks = hydra.lora_parameters()
    return {"actor": [(p, 0) for p in stacks],
            "critic": [(p, 1) for p in stacks] + [(p, None) for p in hydra.value_head.parameters()]}


def run(hydra, ids, mask, critic_lr):
    roles = roles_of(hydra)
    opt = build_ppo_optimizer(roles, SimpleNamespace(lr=1e-2, critic_lr=critic_lr, weight_decay=0.01))
    norms = []
    for _ in range(2):
        opt.zero_grad()
        loss_of(hydra, ids, mask).backward()
        norms.append({k: float(v) for k, v in clip_grad_norm_per_role(roles, 1e-2).items()})
        opt.step()
    return norms, {n: full_tensor(p.detach()) for n, p in hydra.named_parameters() if p.requires_grad}


def main():
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    ids, mask = batch()
    rows = slice(rank * B // world, (rank + 1) * B // world)
    norms_ref, ref = run(build(), ids, mask, critic_lr=1e-3)
    norms, got = run(shard(build()), ids[rows], mask[rows], critic_lr=1e-3)
    _, same_lr = run(build(), ids, mask, critic_lr=1e-2)
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
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank}: per-role clipping and critic_lr under FSDP2 match one process (worst {worst:.2e}); "
          "OPTIM OK", flush=True)


if __name__ == "__main__":
    main()
