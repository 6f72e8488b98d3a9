"""FSDP2 (torch.distributed.fsdp.fully_shard) for a HydraModel or a (patched) causal LM: shard the frozen base
when it does not fit one device, with the library's own paths gathering what they use.

    hydra = HydraModel.from_pretrained_base(path, dtype=torch.bfloat16)
    shard(hydra)                              # every rank, after init_process_group, before the optimizer
    h = hydra.forward_streams(ids, mask)      # scoring, logprobs, values, generate: as without FSDP

`shard` applies fully_shard to each decoder layer and then to the root (the HydraModel or the causal LM), whose
group keeps the embeddings, the final norm, the LM head and the reward / value heads. The root reshards after
every call, so between calls every parameter is its sharded DTensor (what the optimizer, state dicts and
loading see). Library code that uses root parameters outside the root's forward (the decoder called past the
root as `model.base_model`, the LM-head weight of ops.linear_logprobs, the scalar heads, generate) runs through
`gathered_call`, which makes it part of an FSDP forward: the root's all-gather before, its reshard after and,
with grad, the re-gather in backward and the gradient reduce-scatter.

Mixed precision: `mixed_precision=torch.bfloat16` stores the frozen base in bf16 (it is never updated, so it
needs no fp32 master copy) and keeps every trainable parameter (adapters, value head) in its own dtype, fp32.
FSDP's MixedPrecisionPolicy(param_dtype=...) is not used: it casts a whole group, and each HydraLinear holds
its frozen weight and its fp32 adapters in one group, so the adapters would be rounded too and their gradients
computed and reduced in bf16.

Saving under FSDP2 (HydraModel.save_pretrained, merge, export_peft) is collective: every rank calls it, the
tensors are gathered (`full_tensor`), rank 0 writes (`on_rank0`) and every rank learns its outcome.

DeepSpeed ZeRO-3 (an engine from deepspeed.initialize over the model) is handled by the same helpers: its
partitioned parameters (told apart by their `ds_id` attribute, without importing deepspeed) are gathered one
by one by `full_tensor` (deepspeed.zero.GatheredParameters), so saving is collective and written once in the
same way. In the forward, ZeRO-3's module hooks gather what each module's forward reads; `gathered_call`
gathers the LM head, which the library reads outside its module, and `whole` gives the ops a copy of it that
outlives the gather (backward reads it after ZeRO-3 has partitioned the parameter again).
"""
from __future__ import annotations

import types
import weakref
from typing import Callable, Iterable, Mapping

import torch
from torch import nn


__all__ = ["shard", "is_sharded", "sharded_root", "gathered_call", "full_tensor", "local_rows", "copy_row_", "on_rank0",
           "decoder_layers", "any_sharded",
           "keeps_files", "write_once", "full_state_dict", "load_full_", "local_part",
           "shard_like", "full_optimizer_state", "load_optimizer_state_",
           "is_zero3", "full_shape", "whole", "state_tensors", "local_tensor", "refuse_zero3"]

# Attributes shard() sets: on the root, the method FSDP runs as a forward (CALL) and where to look for one of
# the root group's parameters (PROBE); on a causal LM inside a sharded HydraModel, a weak reference to that root.
CALL = "hydra_fsdp_call"
PROBE = "hydra_fsdp_probe"
ROOT = "hydra_fsdp_root"


def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor
    return DTensor


def is_sharded(t) -> bool:
    """True for a DTensor (a parameter FSDP2 holds sharded, or its gradient)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def is_zero3(t) -> bool:
    """True for a parameter DeepSpeed ZeRO-3 manages (partitioned across ranks, or gathered right now)."""
    return getattr(t, "ds_id", None) is not None


def _zero3_gathered(params: list):
    import deepspeed                             # optional: only reached for parameters ZeRO-3 already manages
    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def full_shape(t: torch.Tensor) -> tuple[int, ...]:
    """The whole tensor's shape: a ZeRO-3 parameter's own (ds_shape; locally it is empty), t.shape otherwise."""
    return tuple(t.ds_shape) if is_zero3(t) else tuple(t.shape)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a DTensor all-gathered, a ZeRO-3 parameter gathered and copied out, detached
    (collective in both cases: every rank must call it, in the same order); anything else as it is."""
    if is_sharded(t):
        return t.full_tensor()
    if is_zero3(t):
        if t.ds_status.name == "AVAILABLE":     # whole here already (inside a forward, or kept whole): no gather,
            return t.detach().clone()           # whose exit would partition it under the hooks holding it
        with _zero3_gathered([t]):
            return t.detach().clone()
    return t


def whole(t: torch.Tensor | None) -> torch.Tensor | None:
    """t as an op may keep it for backward: for a frozen ZeRO-3 parameter gathered right now (inside
    gathered_call), a copy, since ZeRO-3 partitions the parameter again before backward reads it; else t.
    Raises ValueError for a trainable one (its gradient would bypass ZeRO-3's reduction)."""
    if t is None or not is_zero3(t):
        return t
    if t.requires_grad:
        raise ValueError(f"t: a trainable parameter ZeRO-3 partitions (shape {full_shape(t)}), read outside its "
                         "module's forward; only a frozen LM head is supported there")
    return t.detach().clone()


def local_rows(t: torch.Tensor, index: int) -> torch.Tensor:
    """The part of row t[index] (leading dimension) this rank holds, as a plain tensor that views the local
    shard (in-place changes reach the DTensor): t[index] itself for a plain tensor; for a DTensor sharded on dim
    0 (FSDP2's default, torch.chunk layout), t[index] on the rank that holds it and an empty tensor elsewhere;
    for one sharded on another dim, the local columns of row index."""
    if not is_sharded(t):
        return t[index]
    from torch.distributed.tensor import Shard
    local = t.to_local()
    if len(t.placements) != 1:
        raise ValueError(f"t: a DTensor on a {len(t.placements)}-d mesh; only 1-d (FSDP) sharding is supported")
    placement = t.placements[0]
    if not isinstance(placement, Shard) or placement.dim != 0:
        return local[index]
    n, world = t.shape[0], t.device_mesh.size()
    chunk = -(-n // world)                       # torch.chunk: ceil(n / world) rows per rank, the last ones fewer
    start = t.device_mesh.get_local_rank() * chunk
    if start <= index < start + local.shape[0]:
        return local[index - start]
    return local.new_empty((0,) + tuple(t.shape[1:]))


def copy_row_(t: torch.Tensor, index: int, value: torch.Tensor) -> None:
    """t[index].copy_(value) (value: the whole row, cast to t's dtype and device), for a DTensor into the part of
    the row this rank holds (local_rows; no communication)."""
    part = local_rows(t, index)
    if is_sharded(t):
        dim = t.placements[0].dim
        if dim != 0:                             # the row is split along dim - 1 of value, torch.chunk layout
            pieces = value.chunk(t.device_mesh.size(), dim=dim - 1)
            rank = t.device_mesh.get_local_rank()
            value = pieces[rank] if rank < len(pieces) else value.narrow(dim - 1, 0, 0)
        elif part.numel() == 0:                  # another rank holds this row
            return
    part.copy_(value.to(device=part.device, dtype=part.dtype))


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers of a causal LM: the children of the largest (by parameter count) nn.ModuleList of
    modules of one type in its backbone (model.base_model): Llama's model.layers, GPT-2's transformer.h, OPT's
    model.decoder.layers. Raises ValueError if there is none."""
    backbone = getattr(model, "base_model", model)
    best, size = None, 0
    for module in backbone.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            n = sum(p.numel() for p in module.parameters())
            if n > size:
                best, size = module, n
    if best is None:
        raise ValueError(f"model: found no decoder layers (an nn.ModuleList of one module type) in "
                         f"{type(backbone).__name__}; pass layers= to shard")
    return list(best)


def _call(self, fn: Callable, *args, **kwargs):
    return fn(*args, **kwargs)


def sharded_root(model: nn.Module) -> nn.Module | None:
    """The FSDP root shard() made of `model` or of the HydraModel that holds it; None if neither is sharded."""
    if hasattr(model, CALL):
        return model
    ref = getattr(model, ROOT, None)
    return ref() if ref is not None else None


def _root_gathered(root: nn.Module) -> bool:
    probe = getattr(root, PROBE)
    if probe is None:                            # the root group holds no parameter: nothing to gather
        return True
    module, name = probe[0](), probe[1]
    return not is_sharded(getattr(module, name))


def _zero3_head(model: nn.Module) -> list:
    """The LM head's ZeRO-3 parameters that are partitioned now (gathered_call gathers them), [] otherwise."""
    head = None
    for lm in (model, getattr(model, "model", None)):    # a causal LM, or the HydraModel holding one as .model
        get = getattr(lm, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if head is not None:
            break
    if head is None:
        return []
    return [p for p in head.parameters() if is_zero3(p) and p.ds_status.name == "NOT_AVAILABLE"]


def gathered_call(model: nn.Module, fn: Callable, *args, lm_head: bool = False, **kwargs):
    """fn(*args, **kwargs) with the root parameters of `model` gathered (see the module docstring): through the
    root's FSDP forward when `model` (or the HydraModel holding it) is sharded and not already inside one; a
    plain call otherwise. fn must read the parameters it uses inside the call (they are DTensors outside) and
    return the tensors that depend on them (backward re-gathers for those). If fn raises, FSDP's state is reset
    (every parameter its shard again) before the exception propagates, so the next call works.
    lm_head=True: fn reads the LM head's weight outside the head's forward (ops.linear_logprobs); under ZeRO-3
    it is gathered for the call (pass it to the op as whole(weight)). Modules fn calls are gathered by ZeRO-3's
    own hooks."""
    head = _zero3_head(model) if lm_head else []
    if head:
        with _zero3_gathered(head):
            return fn(*args, **kwargs)
    root = sharded_root(model)
    if root is None or _root_gathered(root):
        return fn(*args, **kwargs)
    try:
        return getattr(root, CALL)(fn, *args, **kwargs)
    except BaseException:
        # An exception skips FSDP's post-forward: the gathered parameters would stay registered (the next call
        # would read them, stale, while the optimizer updates the shards). Reshard and clear the iteration.
        root.reset_iter_state()
        raise


def _check_dtype(mixed_precision) -> torch.dtype | None:
    if mixed_precision is None:
        return None
    if mixed_precision not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"mixed_precision: expected None, torch.bfloat16, torch.float16 or torch.float32, got "
                         f"{mixed_precision!r} (FSDP's MixedPrecisionPolicy(param_dtype=...) would round the fp32 "
                         "adapters with the frozen weight of their layer; see integrations.fsdp)")
    return mixed_precision


def shard(model: nn.Module, *, mixed_precision: torch.dtype | None = None, layers: Iterable[nn.Module] | None = None,
          mesh=None) -> nn.Module:
    """Apply FSDP2 to `model` in place and return it: fully_shard on each decoder layer, then on the root.

    model: a HydraModel, a causal LM (patched or not), or any module (then layers must be given, or it is
        sharded as one group). Every rank calls this, after torch.distributed.init_process_group, with the
        model on its device, before building the optimizer (which must see the sharded parameters).
    mixed_precision: None (parameters as they are) or the dtype the frozen base is stored and computed in
        (torch.bfloat16, torch.float16); trainable parameters keep their dtype (fp32 adapters, heads).
    layers: the modules to shard one by one (default: decoder_layers of the causal LM).
    mesh: a 1-d DeviceMesh (default: all ranks, on the model's device type).
    Raises ValueError naming the argument (no process group, a model already sharded, a bad dtype).
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
    dtype = _check_dtype(mixed_precision)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise ValueError("model: shard needs a process group; call torch.distributed.init_process_group first "
                         "(torchrun sets the environment it reads)")
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError(f"model: {type(model).__name__} is already sharded")
    from hydra_kernels.integrations.hydra_model import HydraModel
    lm = model.model if isinstance(model, HydraModel) else model
    if layers is None:
        layers = decoder_layers(lm) if hasattr(lm, "base_model") else []
    layers = list(layers)
    if dtype is not None:
        with torch.no_grad():
            for p in lm.parameters():
                if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    # A parameter of the root group, to tell whether the root is gathered right now (see _root_gathered).
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    probe = None
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in in_layers and probe is None:
                probe = (weakref.ref(module), name)
    setattr(model, PROBE, probe)
    setattr(model, CALL, types.MethodType(_call, model))
    register_fsdp_forward_method(model, CALL)
    if lm is not model:
        setattr(lm, ROOT, weakref.ref(model))
    # FSDP picks its root at the first forward; run one through the root now, so that a first call entering at
    # a layer (generation, a decoder layer on its own) finds the tree already rooted here.
    getattr(model, CALL)(lambda: None)
    return model


def on_rank0(write: Callable[[], object], *, what: str = "write", share: bool = False):
    """Run write() on rank 0 only and tell every rank how it went: its result on rank 0 (on every rank with
    share=True: it must then pickle), None elsewhere; if it raised on rank 0, every rank raises (the same
    exception type where it is a ValueError or OSError, RuntimeError otherwise), so no rank waits for one that
    gave up. Collective: every rank calls it. Without an initialised process group it is just write()."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return write()
    result, outcome = None, [None, None]
    if dist.get_rank() == 0:
        try:
            result = write()
            outcome[1] = result if share else None
        except Exception as e:                   # reported to every rank, then re-raised here
            outcome = [(type(e).__name__, str(e)), None]
            error = e
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is None:
        return result if dist.get_rank() == 0 else outcome[1]
    if dist.get_rank() == 0:
        raise error
    kind, message = outcome[0]
    cls = {"ValueError": ValueError, "OSError": OSError, "FileExistsError": OSError}.get(kind, RuntimeError)
    raise cls(f"{what} failed on rank 0: {message}")


def any_sharded(module: nn.Module) -> bool:
    """True if some parameter of `module` is a DTensor (FSDP2 holds it sharded) or ZeRO-3 partitions it."""
    return any(is_sharded(p) or is_zero3(p) for p in module.parameters())


def refuse_zero3(tensors: Iterable[torch.Tensor], what: str) -> None:
    """ValueError naming model if a DeepSpeed ZeRO-3 engine partitions one of `tensors`: writing into them
    would miss the optimizer's fp32 partitions, which DeepSpeed keeps apart (its own utilities set those)."""
    if any(is_zero3(t) for t in tensors):
        raise ValueError(f"model: {what} into parameters a DeepSpeed ZeRO-3 engine partitions is not supported; "
                         "do it on every rank before deepspeed.initialize (or use DeepSpeed's own checkpoints)")


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """module.state_dict(), with each ZeRO-3 parameter as the parameter itself (state_dict detaches it into an
    empty local tensor), so that full_tensor can gather it."""
    state = module.state_dict()
    zero = {n: p for n, p in module.named_parameters(remove_duplicate=False) if is_zero3(p)}
    return {k: zero.get(k, v) for k, v in state.items()} if zero else state


def keeps_files(module: nn.Module) -> bool:
    """Whether this process writes `module`'s files: rank 0 of a sharded module, any process otherwise."""
    return not any_sharded(module) or torch.distributed.get_rank() == 0


def write_once(module: nn.Module, write: Callable[[], object], *, what: str = "write"):
    """write() for a module's files: for a sharded `module` on rank 0 only, with its outcome on every rank
    (on_rank0: every rank calls this), else here (a plain or DDP-replicated module: the caller picks the rank)."""
    return on_rank0(write, what=what) if any_sharded(module) else write()


def full_state_dict(tensors: Mapping[str, torch.Tensor], *, cpu: bool = True) -> dict[str, torch.Tensor]:
    """{name: whole tensor} of a mapping such as PPOModels.named_trainable(): DTensors all-gathered (collective:
    every rank calls it with the same names, in the same order), detached, on the CPU when `cpu`. What a
    checkpoint written on rank 0 takes for the parameters."""
    out = {}
    for name, t in tensors.items():
        full = full_tensor(t).detach()
        out[name] = full.to("cpu", copy=True) if cpu else full
    return out


def _zero3_span(like: torch.Tensor) -> tuple[int, int]:
    # ZeRO-3 splits the flattened parameter into equal, zero-padded pieces, rank r holding the r-th.
    n = like.ds_tensor.numel()
    start = torch.distributed.get_rank(group=like.ds_process_group) * n
    return start, max(0, min(n, like.ds_numel - start))


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """What this rank holds of t: a DTensor's local shard, a ZeRO-3 parameter's flat piece (padding left out),
    t itself otherwise; the same layout local_part cuts from the whole tensor."""
    if is_sharded(t):
        return t.to_local()
    if is_zero3(t):
        return t.ds_tensor.detach()[:_zero3_span(t)[1]]
    return t


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The piece of the whole tensor `full` that this rank holds of the DTensor `like` (torch.chunk along its
    Shard dim; empty where this rank holds none), or of the ZeRO-3 parameter `like` (a flat piece; see
    local_tensor); `full` itself when `like` is a plain tensor."""
    if is_zero3(like):
        start, n = _zero3_span(like)
        return full.reshape(-1)[start:start + n]
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import Shard
    placement = like.placements[0]
    if len(like.placements) != 1 or not isinstance(placement, Shard):
        raise ValueError("like: only 1-d Shard(dim) DTensors (FSDP2) are supported")
    pieces = full.chunk(like.device_mesh.size(), dim=placement.dim)
    rank = like.device_mesh.get_local_rank()
    return pieces[rank] if rank < len(pieces) else full.narrow(placement.dim, 0, 0)


def load_full_(target: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the whole tensor `full` into `target` in place: into this rank's shard when `target` is a DTensor
    (its rows or columns of `full`; no communication), else as a plain copy_. ValueError on a shape mismatch."""
    if tuple(full.shape) != tuple(target.shape):
        raise ValueError(f"full: shape {tuple(full.shape)} does not match the target's {tuple(target.shape)}")
    with torch.no_grad():
        if not is_sharded(target):
            target.copy_(full.to(device=target.device, dtype=target.dtype))
            return
        local = target.to_local()
        local.copy_(local_part(full, target).to(device=local.device, dtype=local.dtype))


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The whole tensor `full` as a DTensor laid out like the DTensor `like` (this rank's piece, no
    communication); `full` itself when `like` is a plain tensor."""
    if not is_sharded(like):
        return full
    from torch.distributed.tensor import DTensor
    piece = local_part(full, like).to(device=like.to_local().device).contiguous()
    return DTensor.from_local(piece, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                              stride=like.stride())


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """optimizer.state_dict() with every DTensor in its per-parameter state gathered (collective: every rank
    calls it), so that rank 0 can write it and any world size can load it (load_optimizer_state_)."""
    sd = optimizer.state_dict()
    state = {i: {k: full_tensor(v) for k, v in per.items()} for i, per in sorted(sd["state"].items())}
    return {**sd, "state": state}


def load_optimizer_state_(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """optimizer.load_state_dict for a state dict of whole tensors (full_optimizer_state, or one process's):
    the state of a sharded parameter is sharded like it first (shard_like; no communication)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for i, per in state_dict["state"].items():
        p = params[int(i)]
        state[i] = {k: shard_like(v, p) if is_sharded(p) and isinstance(v, torch.Tensor) and v.shape == p.shape
                    else v for k, v in per.items()}
    optimizer.load_state_dict({**state_dict, "state": state})

