"""Several processes (torchrun, accelerate launch, torch.distributed.run): the process group, ranks, global
statistics, the rank-0 gate, and the one dispatch point from run.parallel to the engine that trains.

    mode = setup(cfg.run)                    # init from RANK / WORLD_SIZE / LOCAL_RANK if a launcher set them
    device = local_device(resolve_device(cfg.run.device))
    shard(models, cfg.run)                   # fsdp2 only: FSDP2 over each model, before the optimizer
    engine = wrap(params, cfg.run)           # ddp: rank 0's weights everywhere; engine.sync_grads() after backward
    lo, hi = block(n)                        # this rank's rows of a global batch of n
    batch = gather_rows(t)                   # the rows of every rank, in rank order
    path = on_rank0(save, ...)               # written once; a failure there raises on every rank

Semantics (README "Several GPUs"): batch sizes are global, rank r computes its block of each batch, and every
statistic is global, so a run gives the same result at any world size up to fp32 reduction order. With one
process every helper is the identity and no collective runs.

Under "fsdp2" the models are sharded first (shard: integrations.fsdp, before the optimizer is built), FSDP
reduce-scatters their gradients as sums in backward, and the engine all-reduces only the tensors left whole
(the heads of the separate-model variants); everything else is as under ddp.

The engine of "ddp" all-reduces the trainable parameters' gradients itself (one sum per dtype bucket, after
backward), not through torch's DistributedDataParallel: the steps run several modules and streams per forward,
and parameters that get no gradient on any rank (a frozen head, a role a step does not use) must stay without
one, as in a single process (AdamW would otherwise decay them). Each rank's loss is its share of the global
loss (of the token sum over the global token count, say), so the summed gradient is the single-process one.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist

from hydra_kernels.integrations.fsdp import is_sharded
from hydra_kernels.integrations.fsdp import shard as fsdp_shard
from hydra_kernels.rlhf.config import PARALLEL

# Elements per all-reduce of gradients: big enough to amortise a collective, small enough not to double the
# memory of a full model's gradients.
BUCKET_ELEMENTS = 2 ** 25


def env_world_size() -> int:
    """WORLD_SIZE as a launcher (torchrun, accelerate, torch.distributed.run) set it; 1 without one."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE: must be an integer, got {value!r}") from None
    if n < 1:
        raise ValueError(f"WORLD_SIZE: must be >= 1, got {n}")
    return n


def parallel_mode(run_cfg) -> str:
    """run.parallel, or (null) ddp when WORLD_SIZE > 1 and none otherwise. ValueError for none under a
    launcher that started several processes: each would train alone and write the same output_dir."""
    mode = run_cfg.parallel or ("ddp" if env_world_size() > 1 else "none")
    n = max(env_world_size(), world_size())
    if mode == "none" and n > 1:
        raise ValueError(f"run.parallel: 'none' but {n} processes were started "
                         f"(WORLD_SIZE); use run.parallel=ddp or start one process")
    # One process holds every weight anyway; sharding over one would only add FSDP's bookkeeping.
    if mode == "fsdp2" and n < 2:
        raise ValueError("run.parallel: 'fsdp2' shards the models over several processes, but 1 was started; "
                         "start 2 or more (torchrun --nproc_per_node N) or use run.parallel=none")
    return mode


def setup(run_cfg, timeout: datetime.timedelta | None = None) -> str:
    """The parallel mode of `run_cfg` (parallel_mode); under ddp and fsdp2, initialise the default process group from the
    environment unless one exists already: nccl when the run uses CUDA, else gloo. timeout: of every collective
    (torch's default when None), so a rank that died makes the others fail instead of wait forever."""
    mode = parallel_mode(run_cfg)
    if mode in ("ddp", "fsdp2") and max(env_world_size(), world_size()) > 1 and ":" in run_cfg.device:
        raise ValueError(f"run.device: {run_cfg.device!r} puts every process on one GPU; use cuda (or auto): "
                         f"process r runs on cuda:LOCAL_RANK")
    if mode in ("ddp", "fsdp2") and not dist.is_initialized() and env_world_size() > 1:
        for var in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if var not in os.environ:
                raise ValueError(f"WORLD_SIZE: is {env_world_size()} but {var} is not set; start the job with "
                                 f"torchrun or accelerate launch")
        cuda = run_cfg.device.startswith("cuda") or (run_cfg.device == "auto" and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl" if cuda else "gloo", **({"timeout": timeout} if timeout else {}))
    return mode


def shutdown() -> None:
    """Destroy the default process group, if one exists (at the end of a CLI command)."""
    if dist.is_initialized():
        dist.barrier()                      # no rank tears gloo down while another still talks to it
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the one that writes files, metrics and the progress bar."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """`device` with this process's GPU under several processes (cuda -> cuda:LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and world_size() > 1:
        return torch.device("cuda", local_rank())
    return device


def _comm_device() -> torch.device:
    """Where collectives' tensors live: the current GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------- batches
def block(n: int, name: str | None = None) -> tuple[int, int]:
    """[lo, hi): this rank's block of n rows. With `name`, n must divide evenly (ValueError naming that
    setting); without, the blocks differ by at most one row (and may be empty)."""
    w, r = world_size(), rank()
    if name is not None and n % w:
        raise ValueError(f"{name}: must be divisible by the number of processes ({w}), got {n}")
    return r * n // w, (r + 1) * n // w


def gather_rows(t: torch.Tensor | None, pad=0) -> torch.Tensor | None:
    """The rows (dim 0) of `t` from every rank, in rank order; dim 1 (if any) padded with `pad` to the longest
    of any rank. Every rank must pass as many rows. None stays None (on every rank)."""
    if t is None or world_size() == 1:
        return t
    dev = _comm_device()
    x = t.to(dev)
    dtype = x.dtype
    if dtype == torch.bool:                       # gloo has no bool collectives
        x = x.to(torch.uint8)
    if x.dim() >= 2:
        width = torch.tensor([x.shape[1]], device=dev)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        extra = int(width) - x.shape[1]
        if extra:
            x = torch.cat([x, x.new_full((x.shape[0], extra, *x.shape[2:]), pad)], 1)
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts).to(device=t.device, dtype=dtype)


def gather_dataclass(obj, pads: dict[str, object] | None = None):
    """A dataclass of per-row tensors (a Rollout, Scores) with every field gathered by gather_rows (field f
    padded with pads[f], default 0)."""
    pads = pads or {}
    return type(obj)(**{f.name: gather_rows(getattr(obj, f.name), pads.get(f.name, 0))
                        for f in dataclasses.fields(obj)})


# ------------------------------------------------------------------------------------------ statistics
def all_sum(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of `values` over ranks (a new tensor on values' device, values' dtype)."""
    if world_size() == 1:
        return values
    x = values.detach().to(_comm_device(), copy=True)
    dist.all_reduce(x)
    return x.to(values.device)


def sum_dict(values: dict[str, torch.Tensor | float]) -> dict[str, torch.Tensor]:
    """{name: sum over ranks} of scalars, in one collective (fp64, so a count stays exact)."""
    if world_size() == 1:
        return {k: torch.as_tensor(v).detach() for k, v in values.items()}      # values, never part of a graph
    x = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().cpu().reshape(()) for v in values.values()])
    x = all_sum(x.to(_comm_device()))
    return dict(zip(values, x.cpu()))


def agree(value, name: str) -> None:
    """ValueError (on every rank) unless `value` (picklable) is the same on every rank: e.g. the step a run
    resumes from, which differs when output_dir is not one shared directory."""
    if world_size() == 1:
        return
    seen: list = [None] * world_size()
    dist.all_gather_object(seen, value)
    if any(v != seen[0] for v in seen):
        each = ", ".join(f"rank {i}: {v!r}" for i, v in enumerate(seen))
        raise ValueError(f"{name}: differs between the processes ({each}); every process must see the same inputs "
                         f"and run.output_dir (a shared directory)")


def from_rank0(value):
    """Rank 0's `value` (picklable) on every rank: a decision only one rank may take (a wall-clock schedule)."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def on_rank0(fn: Callable, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0 only (a file written once); every rank returns its result (picklable), or
    raises when it raised on rank 0 — a ValueError as a ValueError with its message, anything else as a
    RuntimeError naming it — so no rank waits for a rank 0 that failed."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    box: list = [None]
    error = None
    if is_main():
        try:
            box[0] = ("ok", fn(*args, **kwargs))
        except Exception as e:            # noqa: BLE001 - every failure must reach the other ranks
            error = e
            box[0] = ("error", type(e).__name__, str(e), isinstance(e, ValueError))
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    if error is not None:
        raise error
    if box[0][0] == "error":
        _, kind, message, is_value = box[0]
        if is_value:
            raise ValueError(message)
        raise RuntimeError(f"rank 0 failed: {kind}: {message}")
    return box[0][1]


# ---------------------------------------------------------------------------------------------- engines
class Replicated:
    """Every rank holds all of the (trainable) parameters: single process and ddp. Under ddp the parameters
    start as rank 0's, and sync_grads() sums the gradients over ranks (each rank's loss being its share of
    the global sum); a parameter without a gradient on every rank keeps none."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = list(params)
        if world_size() > 1:
            with torch.no_grad():
                for p in self.params:
                    x = p.detach().to(_comm_device(), copy=True)
                    dist.broadcast(x, src=0)
                    p.copy_(x)

    def sync_grads(self) -> None:
        if world_size() == 1 or not self.params:          # fsdp2 with every trained tensor sharded: FSDP's job
            return
        dev = _comm_device()
        has = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32, device=dev)
        dist.all_reduce(has)
        live = [p for p, h in zip(self.params, has.tolist()) if h]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in live:
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        for group in by_dtype.values():
            bucket, size = [], 0
            for p in group + [None]:
                if p is not None and (not bucket or size + p.numel() <= BUCKET_ELEMENTS):
                    bucket.append(p)
                    size += p.numel()
                    continue
                flat = torch.cat([q.grad.reshape(-1) for q in bucket]).to(dev)
                dist.all_reduce(flat)
                offset = 0
                for q in bucket:
                    q.grad.copy_(flat[offset:offset + q.numel()].view_as(q.grad))
                    offset += q.numel()
                bucket, size = ([p], p.numel()) if p is not None else ([], 0)


def shard(modules: Sequence[torch.nn.Module], run_cfg) -> bool:
    """Under run.parallel=fsdp2, integrations.fsdp.shard each of `modules` (every rank, same order, after the
    models are built and before the optimizer is) and return True; otherwise leave them alone, False. FSDP's
    reduce-scatter then sums the gradients over ranks (each rank's loss is its share of the global loss), as
    Replicated.sync_grads does, instead of averaging them."""
    if parallel_mode(run_cfg) != "fsdp2":
        return False
    from torch.distributed.fsdp import FSDPModule
    for module in modules:
        fsdp_shard(module)
        for m in module.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)     # a plain sum (gloo has no pre-scaled sum)
    return True


def wrap(params: Sequence[torch.Tensor], run_cfg) -> Replicated:
    """The engine run.parallel asks for, over the trainable parameters: Replicated for none and ddp; for fsdp2,
    Replicated over the parameters FSDP does not hold (heads kept outside the sharded models: all-reduced like
    ddp's), since FSDP reduce-scatters its own in backward (shard)."""
    mode = parallel_mode(run_cfg)
    if mode in ("none", "ddp"):
        return Replicated(params)
    if mode == "fsdp2":
        return Replicated([p for p in params if not is_sharded(p)])
    raise ValueError(f"run.parallel: must be one of {', '.join(PARALLEL)}, got {mode!r}")


def clip_grad_norm_(params: Sequence[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, also over parameters some of which FSDP2 holds sharded (DTensors mixed
    with plain ones, which torch's cannot stack): their shares of the norm are summed over the ranks."""
    if not any(is_sharded(p) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    from hydra_kernels.rlhf.optim import clip_grad_norm_per_role
    norms = clip_grad_norm_per_role({"all": [(p, None) for p in params]}, max_norm)
    return norms.get("all", torch.zeros(()))


__all__ = ["PARALLEL", "env_world_size", "parallel_mode", "setup", "shutdown", "world_size", "rank", "local_rank",
           "is_main", "local_device", "block", "gather_rows", "gather_dataclass", "all_sum", "sum_dict",
           "agree", "from_rank0", "on_rank0", "Replicated", "shard", "wrap", "clip_grad_norm_"]
