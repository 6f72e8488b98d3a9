"""Files: atomic writes, the Hydra checkpoint (adapters + heads + JSON config), merged transformers directories.

Everything is safetensors + JSON; nothing is pickled. A file is written to a temporary name in the same
directory, fsynced, then os.replace'd over the target, so a crash leaves either the old file or the new one.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from hydra_kernels.integrations.fsdp import (copy_row_, full_tensor, is_sharded, is_zero3, keeps_files, refuse_zero3,
                                             state_tensors, write_once)
from hydra_kernels.integrations.patch import MERGED_CONFIG_KEY, hydra_modules, patch_info

__all__ = ["atomic_write", "atomic_write_json", "fsync_path", "atomic_save_safetensors", "load_safetensors",
           "adapter_tensors", "load_adapter_tensors", "merged_state_dict", "merge_adapter_into_base",
           "gathered_copy", "save_merged", "check_replaceable", "write_dir_atomically", "read_dir_marker", "remove_leftovers",
           "CONFIG_NAME",
           "WEIGHTS_NAME", "DIR_MARKER", "MERGED_KIND"]

CONFIG_NAME = "hydra_config.json"
# Written by write_dir_atomically into every directory it makes: what wrote it (the kind) and the entries it
# wrote. Only such a directory (of the same kind) may later be replaced as a whole; see check_replaceable.
DIR_MARKER = ".hydra_kernels.json"
DIR_MARKER_FORMAT = "hydra_kernels.dir"
# The kind (marker) of a merged transformers model directory (save_merged, `--merge-to`).
MERGED_KIND = "config.json"
# Files of the directories a merged model must not replace: a Hydra-SFT result, a PPO policy, a checkpoint, a
# HydraModel or PEFT checkpoint (all of which also hold, or may hold, a config.json).
MERGE_FOREIGN = ("sft.json", "reward_head.safetensors", "policy.json", "state.json", "hydra_config.json",
                 "adapter_config.json")
WEIGHTS_NAME = "hydra_model.safetensors"
FORMAT = "hydra_kernels.HydraModel"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- atomic writes
def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory after a rename makes the rename durable); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:              # some platforms cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call write(tmp_path), fsync the result, then rename it over `path` (same directory, so same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        write(str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_json(path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)


def atomic_save_safetensors(path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file
    # Copies: adapter rows are views into one stacked Parameter, and some safetensors versions refuse tensors
    # that share storage (adapters and heads are small).
    cpu = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=metadata))


def load_safetensors(path, *, name: str = "path",
                     finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, on the CPU.

    Raises ValueError naming `name` and the file when it is missing or not a readable safetensors file
    (truncated, a pickle, a bad header), and, with `finite`, naming the tensor when a floating-point tensor
    holds NaN or inf."""
    from safetensors import SafetensorError, safe_open
    if not Path(path).is_file():
        raise ValueError(f"{name}: {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{name}: {str(path)!r} is not a readable safetensors file "
                         f"({' '.join(str(e).split()) or type(e).__name__}); is it truncated?") from None
    if finite:
        for key, t in tensors.items():
            if (t.is_floating_point() or t.is_complex()) and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name}: tensor {key!r} in {str(path)!r} holds NaN or inf values")
    return tensors, meta


# ------------------------------------------------------------------------------------- adapters in a state dict
def adapter_key(adapter: str, path: str, which: str) -> str:
    return f"adapters.{adapter}.{path}.{which}"


def adapter_tensors(model: nn.Module, adapters=None) -> dict[str, torch.Tensor]:
    """{adapters.<name>.<module path>.lora_A: [r, in], ....lora_B: [out, r]} for the given adapters (default all)."""
    info = patch_info(model)
    names = info.adapters if adapters is None else tuple(adapters)
    out = {}
    layers = hydra_modules(model)
    for name in names:                        # checked before any collective, the same on every rank
        if next(iter(layers.values())).stream_indices([name])[0] < 0:
            raise ValueError(f"adapters: {name!r} is the base stream, which has no adapter weights")
    for path, layer in layers.items():
        # Whole stacks: FSDP2 holds them sharded (an all-gather per stack; every rank takes part).
        A, B = full_tensor(layer.lora_A).detach(), full_tensor(layer.lora_B).detach()
        for name in names:
            i = layer.stream_indices([name])[0]
            out[adapter_key(name, path, "lora_A")] = A[i]
            out[adapter_key(name, path, "lora_B")] = B[i]
    return out


def load_adapter_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], adapters, source: str,
                         extra_ok: Callable[[str], bool] = lambda k: False) -> None:
    """Copy adapter tensors into the model, after checking every one of them (nothing changes on error).

    Every (adapter, module) pair must be present with the right shape; any other key must satisfy extra_ok.
    """
    layers = hydra_modules(model)
    plan = []
    expected = set()
    for path, layer in layers.items():
        for name in adapters:
            i = layer.stream_indices([name])[0]
            for which, param in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B)):
                key = adapter_key(name, path, which)
                expected.add(key)
                if key not in tensors:
                    raise ValueError(f"{source}: missing tensor {key!r} (the model has adapter {name!r} on {path!r})")
                t = tensors[key]
                if not t.is_floating_point():
                    raise ValueError(f"{source}: tensor {key!r} has dtype {t.dtype}; adapters are floating point")
                if tuple(t.shape) != tuple(param.shape[1:]):
                    raise ValueError(f"{source}: tensor {key!r} has shape {tuple(t.shape)}, the model expects "
                                     f"{tuple(param.shape[1:])} (rank {layer.r}, layer {layer.in_features}->"
                                     f"{layer.out_features})")
                plan.append((param, i, t))
    unexpected = [k for k in tensors if k not in expected and not extra_ok(k)]
    if unexpected:
        raise ValueError(f"{source}: unexpected tensor {unexpected[0]!r}" +
                         (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "") +
                         "; it names no patched module / adapter of this model")
    with torch.no_grad():
        for param, i, t in plan:
            copy_row_(param, i, t)               # into this rank's part where FSDP2 shards the stack


# -------------------------------------------------------------------------------------------------- merging
def _delta(layer, adapter: str | None) -> torch.Tensor | None:
    if adapter is None or adapter == "base":
        return None
    i = layer.stream_indices([adapter])[0]
    # HydraLinear.delta_weight from the whole stacks (gathered where FSDP2 shards them).
    A, B = full_tensor(layer.lora_A).detach(), full_tensor(layer.lora_B).detach()
    return layer.scaling * (B[i].float() @ A[i].float())


def merge_adapter_into_base(model: nn.Module, adapter: str) -> None:
    """Fold `adapter` into the base weights in place (W ← W + scaling·B·A, in fp32, rounded once), then reset
    that adapter (B = 0, A re-initialised), so its stream starts again from the new base.

    This is how Hydra-SFT's result becomes the reference policy and the reward model ("LoRA off"). The base
    Parameters are shared with whatever the model was built from: anything else holding them sees the change.
    """
    info = patch_info(model)
    if adapter not in info.adapters:
        raise ValueError(f"adapter: {adapter!r} is not one of the model's adapters {info.adapters}")
    refuse_zero3(model.parameters(), "merge_adapter_into_base")
    with torch.no_grad():
        for layer in hydra_modules(model).values():
            i = layer.stream_indices([adapter])[0]
            w = layer.weight
            w.copy_((w.float() + layer.delta_weight(adapter)).to(w.dtype))
            layer.lora_B[i].zero_()
            nn.init.kaiming_uniform_(layer.lora_A[i], a=5 ** 0.5)
    model.hydra_patch = dataclasses.replace(info, merged=info.merged + (adapter,))
    if getattr(model, "config", None) is not None:
        setattr(model.config, MERGED_CONFIG_KEY, list(info.merged + (adapter,)))


def _output_embedding_key(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    for path, module in model.named_modules(remove_duplicate=False):
        if module is head:
            return f"{path}.weight" if path else "weight"
    return None


def merged_state_dict(model: nn.Module, adapter: str | None, *, everywhere: bool = False) -> dict[str, torch.Tensor]:
    """The model's state dict as the unpatched architecture has it, with `adapter` folded into the weights
    (None or "base": the base weights as they are), on the CPU. Under FSDP2 only the rank that writes keeps
    the tensors, every rank with `everywhere`.

    LoRA stacks are dropped, Conv1D weights transposed back to [in, out], and a tied output embedding left out
    (transformers re-ties it on load). Merging is done layer by layer in fp32 and rounded once to the weight dtype.
    """
    info = patch_info(model)
    if adapter not in (None, "base") and adapter not in info.adapters:
        raise ValueError(f"adapter: {adapter!r} is not one of the model's adapters {info.adapters}")
    layers = hydra_modules(model)
    weight_keys = {f"{p}.weight": p for p in layers}
    lora_keys = {f"{p}.{w}" for p in layers for w in ("lora_A", "lora_B")}
    state = state_tensors(model)
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    tied_head = _output_embedding_key(model)
    # Under FSDP2 every rank gathers each tensor in turn (collective: the same keys in the same order on every
    # rank), and only the rank that writes keeps it.
    keep = everywhere or keeps_files(model)
    for key, t in state.items():
        if key in lora_keys:
            continue
        if is_sharded(t):
            # Tied parameters share the local shard's storage (state_dict detaches: new objects per name).
            local = t.to_local()
            ident = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape), t.dtype) \
                if local.numel() else None
            t = full_tensor(t.detach())
        elif is_zero3(t):                        # the parameter itself (state_tensors): tied names share it
            ident = ("zero3", id(t))
            t = full_tensor(t)
        else:
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() \
                else None
        if key in weight_keys:
            layer = layers[weight_keys[key]]
            delta = _delta(layer, adapter)
            if not keep:
                continue
            with torch.no_grad():
                w = t if delta is None else (t.float() + delta).to(t.dtype)
                if weight_keys[key] in info.conv1d:
                    w = w.t()
                out[key] = w.detach().to("cpu").contiguous()
            continue
        if not keep:
            continue
        if ident is not None and ident in seen:
            if key == tied_head:
                continue                     # tied LM head: transformers re-ties it from the input embedding
            if seen[ident] == tied_head:
                out[key] = out.pop(tied_head)
                seen[ident] = key
                continue
            out[key] = t.detach().to("cpu").clone()   # some other sharing: safetensors wants distinct tensors
            continue
        if ident is not None:
            seen[ident] = key
        out[key] = t.detach().to("cpu")
    return out


def _shard(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards, current, size = [], {}, 0
    for k, t in state.items():
        n = t.numel() * t.element_size()
        if current and size + n > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def read_dir_marker(out_dir) -> dict | None:
    """The marker write_dir_atomically left in out_dir ({"kind", "entries"}), or None if there is none or it is
    not one (unreadable, another format)."""
    path = Path(out_dir) / DIR_MARKER
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if (not isinstance(marker, dict) or marker.get("format") != DIR_MARKER_FORMAT
            or not isinstance(marker.get("entries"), list)):
        return None
    return marker


def check_replaceable(out_dir, *, name: str = "out_dir", marker: str | None = None,
                      foreign: tuple[str, ...] = ()) -> None:
    """Refuse (ValueError naming `name` and the path) to replace out_dir unless it is missing, empty, or an
    earlier result of the same writer: the writers swap the new result in and DELETE what the directory held,
    so a user's own directory (a pretrained model, runs/, a data directory) or another kind of result must
    never be taken for one.

    An earlier result is a directory that write_dir_atomically wrote with the same `marker` (its kind, recorded
    in DIR_MARKER) and that holds nothing it did not write and none of `foreign`."""
    out = Path(out_dir)
    if not out.exists() and not out.is_symlink():
        return
    if out.is_symlink() or not out.is_dir():
        raise ValueError(f"{name}: {str(out)!r} exists and is not a directory" +
                         (" (a symbolic link)" if out.is_symlink() else ""))
    entries = sorted(e.name for e in out.iterdir())
    if not entries:
        return
    found = read_dir_marker(out)
    why = next((f"holds {e!r}" for e in entries if e in foreign), None)
    if why is None and found is None:
        shown = ", ".join(repr(e) for e in entries[:3]) + (", ..." if len(entries) > 3 else "")
        why = f"was not written by hydra_kernels (no {DIR_MARKER}; it holds {shown})"
    if why is None and found.get("kind") != marker:
        why = f"is another kind of hydra_kernels result ({found.get('kind')!r}, not {marker!r})"
    if why is None:
        extra = [e for e in entries if e != DIR_MARKER and e not in found["entries"]]
        if extra:
            why = f"holds {extra[0]!r}, which hydra_kernels did not write there"
    if why is not None:
        raise ValueError(f"{name}: {str(out)!r} {why}; writing there would delete all it holds. Give a new or "
                         "empty directory")


_TMP, _OLD = ".tmp-", ".old-"       # write_dir_atomically's names beside out_dir: .<name>.tmp-*, .<name>.old-*


def remove_leftovers(parent, names: str, *, marker: str | None) -> list[Path]:
    """Remove what write_dir_atomically left in `parent` when killed while writing a result named like the glob
    `names` (e.g. "final", "step-*") of kind `marker`: its temporary directories, and the earlier results it
    had swapped out, except that an earlier result whose place is empty is renamed back (the kill came between
    the two renames). Only directories holding write_dir_atomically's marker of that kind (or empty ones) are
    touched; anything else of such a name is left alone. Returns the paths removed. Call it only where no other
    process writes the same results at the same time."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []

    def ours(d: Path) -> bool:
        if d.is_symlink() or not d.is_dir():
            return False
        try:
            with open(d / DIR_MARKER) as f:
                found = json.load(f)
        except FileNotFoundError:
            return not any(d.iterdir())        # killed before the marker was written
        except (OSError, ValueError):
            return False
        return isinstance(found, dict) and found.get("format") == DIR_MARKER_FORMAT and found.get("kind") == marker

    olds = sorted((d for d in parent.glob(f".{names}{_OLD}*") if ours(d)), key=lambda d: d.stat().st_mtime)
    for d in olds[::-1]:
        target = parent / d.name[1:d.name.rindex(_OLD)]
        if not target.exists() and not target.is_symlink() and read_dir_marker(d) is not None:
            os.replace(d, target)
            continue
        shutil.rmtree(d)
        removed.append(d)
    for d in parent.glob(f".{names}{_TMP}*"):
        if ours(d):
            shutil.rmtree(d)
            removed.append(d)
    return removed


def write_dir_atomically(out_dir: str | os.PathLike, fill, marker: str | None = None, *, name: str = "out_dir",
                         foreign: tuple[str, ...] = ()) -> Path:
    """Call fill(tmp_dir) on a temporary directory beside out_dir, add the DIR_MARKER file (kind `marker`, the
    entries fill wrote), fsync every file and directory in it, then rename it to out_dir, so a crash leaves
    either no result or a whole one.

    marker: the kind of result (by convention the name of the file that identifies it, e.g. "sft.json");
        an existing out_dir is replaced only if it is an earlier result of the same kind (check_replaceable;
        ValueError naming `name` otherwise, nothing written); it is swapped out first and removed after.
    Returns out_dir as a Path."""
    check_replaceable(out_dir, name=name, marker=marker, foreign=foreign)
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP}", dir=out.parent))
    try:
        # A partial marker first (no entries: never taken for a result), so that remove_leftovers knows this
        # directory for one of ours if a kill leaves it behind.
        with open(tmp / DIR_MARKER, "w") as f:
            json.dump({"format": DIR_MARKER_FORMAT, "kind": marker, "entries": None}, f)
        fill(tmp)
        entries = sorted(e.name for e in tmp.iterdir() if e.name != DIR_MARKER)
        with open(tmp / DIR_MARKER, "w") as f:
            json.dump({"format": DIR_MARKER_FORMAT, "kind": marker, "entries": entries}, f, indent=1)
            f.write("\n")
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        for d in sorted((d for d in tmp.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)) + [tmp]:
            fsync_path(d)                     # the entries: a durable rename of a directory could lose its files
        old = None
        if out.exists():
            old = out.parent / f".{out.name}{_OLD}{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_path(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def gathered_copy(model: nn.Module, adapter: str | None = None) -> nn.Module:
    """A new plain model (unsharded, unpatched) of `model`'s transformers architecture and config, on the CPU,
    holding its weights with `adapter` folded in (None: as they are; a patched model: merged_state_dict): what
    a run that trained a model sharded by FSDP2 returns. Collective under FSDP2: every rank calls it and gets
    the whole model."""
    from torch.distributed.fsdp import FSDPModule
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model: {type(model).__name__} has no transformers config to rebuild it from")
    # fully_shard swaps in a subclass of (FSDPModule, architecture): the first other class is the architecture.
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    config = copy.deepcopy(config)
    if getattr(model, "hydra_patch", None) is not None:
        state = merged_state_dict(model, adapter, everywhere=True)
        if adapter not in (None, "base"):        # as merge_adapter_into_base records it
            setattr(config, MERGED_CONFIG_KEY, list(patch_info(model).merged + (adapter,)))
    else:
        state = {k: full_tensor(v).detach().to("cpu", copy=True) for k, v in state_tensors(model).items()}
    with torch.device("cpu"):
        plain = cls(config)
    missing, unexpected = plain.load_state_dict(state, strict=False, assign=True)
    head = _output_embedding_key(plain)
    if unexpected or [k for k in missing if k != head]:
        raise ValueError(f"model: its weights do not fit a fresh {cls.__name__} (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]})")
    plain.tie_weights()                           # a tied LM head left out of the state: shared again
    return plain.eval()


def save_merged(model: nn.Module, adapter: str | None, out_dir, tokenizer=None,
                max_shard_size: int = 5 * 1024 ** 3) -> Path:
    """Write a plain transformers model directory (config.json, generation_config.json, model*.safetensors,
    the tokenizer if given) with `adapter` folded in (None or "base": the base weights as they are);
    AutoModelForCausalLM.from_pretrained loads it.

    The directory is built next to out_dir and renamed into place when complete. An existing out_dir is replaced
    as a whole only if it is an earlier merged model directory written here (see check_replaceable); anything
    else (the user's own pretrained model included) raises ValueError naming out_dir, and nothing is written.
    With adapter None / "base", out_dir then holds this model's base: it becomes the model's base directory
    (config.name_or_path, absolute), which export_peft names. Returns out_dir as a Path.
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "save_pretrained"):
        raise ValueError(f"model: {type(model).__name__} has no transformers config to write")
    state = merged_state_dict(model, adapter)

    def fill(tmp: Path) -> None:
        from safetensors.torch import save_file
        shards = _shard(state, max_shard_size)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for s, shard in enumerate(shards):
                name = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            with open(tmp / "model.safetensors.index.json", "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        cfg = copy.deepcopy(config)
        cfg.architectures = [type(model).__name__]
        merged = list(patch_info(model).merged) + ([adapter] if adapter not in (None, "base") else [])
        if merged:
            setattr(cfg, MERGED_CONFIG_KEY, merged)
        elif hasattr(cfg, MERGED_CONFIG_KEY):
            delattr(cfg, MERGED_CONFIG_KEY)
        dtype = next(iter(t.dtype for t in state.values() if t.is_floating_point()), None)
        if dtype is not None:
            # transformers ≥ 4.56 calls it `dtype`, older versions `torch_dtype`.
            setattr(cfg, "dtype" if hasattr(cfg, "dtype") else "torch_dtype", dtype)
        cfg.save_pretrained(str(tmp))
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    # Under FSDP2: written by rank 0, its outcome on every rank (integrations.fsdp.write_once).
    out = write_once(model, lambda: write_dir_atomically(out_dir, fill, marker=MERGED_KIND, foreign=MERGE_FOREIGN),
                     what="save_merged") or Path(out_dir)
    if adapter in (None, "base"):
        config.name_or_path = str(out.resolve())
    return out
