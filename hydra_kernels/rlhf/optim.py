"""PPO's optimizer: AdamW with one learning rate for the actor and one for the critic (`critic_lr`), and
gradient clipping jointly (as TRL) or per role (`clip_grad_per_role`, as with separate actor / critic engines).

The separate-model variants (lora, full) simply put the critic in its own param group. Hydra-PPO cannot: the
actor's and the critic's LoRA factors live in one stacked Parameter per layer (lora_A [adapters, r, in],
lora_B [adapters, out, r]) because the fused kernel reads every adapter from one tensor. AdamW's step is
linear in the learning rate, decoupled weight decay included (p <- p - lr * (wd * p + m_hat / (sqrt(v_hat) +
eps))), and each element's moments depend only on that element's gradients, so scaling the change of the
critic's slice by critic_lr / lr after the step is AdamW with critic_lr on that slice, up to one rounding.

Implementation (adamw_implementation): fused on CUDA (one kernel per parameter group, no temporaries); elsewhere
the for-loop step, since torch's default foreach step on an accelerator holds temporaries the size of all
trainable parameters at once.

Both work on parameters FSDP2 holds sharded (DTensors, integrations.fsdp): a slice is the part of it this rank
holds (fsdp.local_rows), and the per-role gradient norm sums the ranks' shares (an all-reduce).
"""
from __future__ import annotations

from typing import Iterable

import torch

from hydra_kernels.integrations.fsdp import is_sharded, local_rows
from hydra_kernels.rlhf.models import Role


class SlicedLRAdamW(torch.optim.AdamW):
    """AdamW in which chosen slices `p[i]` (leading dimension) move `ratio` times as far as their group's
    learning rate would move them. slice_ratios: (parameter, index, ratio) triples; ratio 1 is a no-op, and
    with no slices this is plain AdamW, bitwise."""

    def __init__(self, params, *, slice_ratios: Iterable[tuple[torch.Tensor, int, float]] = (), **kwargs):
        super().__init__(params, **kwargs)
        self._implementation = {k: self.defaults[k] for k in ("fused", "foreach")}
        owned = {id(p) for g in self.param_groups for p in g["params"]}
        self.slice_ratios = []
        for p, i, ratio in slice_ratios:
            if id(p) not in owned:
                raise ValueError("slice_ratios: a parameter that is not in any param group")
            if not 0 <= i < p.shape[0]:
                raise ValueError(f"slice_ratios: index {i} out of range for a leading dimension of {p.shape[0]}")
            if not ratio >= 0:
                raise ValueError(f"slice_ratios: ratio must be >= 0, got {ratio!r}")
            if ratio != 1.0:
                self.slice_ratios.append((p, int(i), float(ratio)))

    def load_state_dict(self, state_dict: dict) -> None:
        """As AdamW's, but this optimizer keeps its own implementation (fused / foreach), not the saved one's:
        a checkpoint written on another device or by another version resumes with the fast path of this one."""
        groups = [{**g, **self._implementation} for g in state_dict["param_groups"]]
        super().load_state_dict({**state_dict, "param_groups": groups})

    @torch.no_grad()
    def step(self, closure=None):
        # The blend runs in fp32 at least, so bf16 / fp16 slices round once, at the final copy.
        # A sharded parameter's slice is this rank's part of it (empty where another rank holds it all).
        before = [local_rows(p, i).to(torch.promote_types(p.dtype, torch.float32), copy=True)
                  for p, i, _ in self.slice_ratios]
        loss = super().step(closure)
        for (p, i, ratio), b in zip(self.slice_ratios, before):
            part = local_rows(p, i)
            part.copy_(torch.lerp(b, part.to(b.dtype), ratio))
        return loss


def adamw_implementation(device: torch.device) -> dict:
    """AdamW's implementation flags for parameters on `device`: fused on CUDA, else the for-loop step (no
    foreach temporaries; on a CPU that is torch's default anyway)."""
    if torch.device(device).type == "cuda":
        return {"fused": True, "foreach": False}
    return {"fused": False, "foreach": False}


def build_ppo_optimizer(roles: dict[str, Role], cfg) -> SlicedLRAdamW:
    """AdamW over the parameters of `roles` (models.PPOModels.roles()): the actor's at cfg.lr, the critic's at
    cfg.critic_lr (default cfg.lr); a stack shared by both roles sits in the actor's group with its critic
    slice scaled. Fused on CUDA, the for-loop step elsewhere (adamw_implementation)."""
    critic_lr = cfg.lr if cfg.critic_lr is None else cfg.critic_lr
    actor = list({id(p): p for p, _ in roles["actor"]}.values())
    critic = [p for p, i in roles["critic"] if i is None]
    ratio = critic_lr / cfg.lr
    slices = [(p, i, ratio) for p, i in roles["critic"] if i is not None] if critic_lr != cfg.lr else []
    groups = [{"params": actor, "lr": cfg.lr}, {"params": critic, "lr": critic_lr}]
    devices = {p.device.type for p in actor + critic} or {"cpu"}
    if len(devices) != 1:
        raise ValueError(f"run.device: the trained parameters are on several device types {sorted(devices)}")
    return SlicedLRAdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, slice_ratios=slices,
                         **adamw_implementation(torch.device(devices.pop())))


def _local_grad(p: torch.Tensor, i: int | None):
    """(this rank's part of p.grad, or of its slice p.grad[i], as a plain tensor that views it; the process group
    over which a sharded gradient's parts are spread, None for a plain one)."""
    g = p.grad
    if is_sharded(g):
        return (g.to_local() if i is None else local_rows(g, i)), g.device_mesh.get_group()
    return (g if i is None else g[i]), None


def clip_grad_norm_per_role(roles: dict[str, Role], max_norm: float) -> dict[str, torch.Tensor]:
    """torch.nn.utils.clip_grad_norm_ applied to each role on its own (slices of a shared stack included):
    {role: its gradient norm before clipping}."""
    norms = {}
    for role, items in roles.items():
        parts = [_local_grad(p, i) for p, i in items if p.grad is not None]
        if not parts:
            continue
        each = [torch.linalg.vector_norm(g.float()) for g, _ in parts]
        shards = [n for n, (_, group) in zip(each, parts) if group is not None]
        if not shards:
            total = torch.linalg.vector_norm(torch.stack(each))
        else:
            # Every rank holds a share of a sharded gradient: the squares add up over the ranks.
            sq = torch.stack(shards).square().sum()
            torch.distributed.all_reduce(sq, group=next(group for _, group in parts if group is not None))
            plain = [n for n, (_, group) in zip(each, parts) if group is None]
            total = (sq + torch.stack(plain).square().sum() if plain else sq).sqrt()
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for g, _ in parts:
            g.mul_(coef.to(g.dtype))
        norms[role] = total
    return norms


__all__ = ["SlicedLRAdamW", "adamw_implementation", "build_ppo_optimizer", "clip_grad_norm_per_role"]
