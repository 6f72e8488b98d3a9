"""Atomic training checkpoints in safetensors + JSON (never pickle), and the saved SFT / PPO results.

A checkpoint is a directory `<root>/step-00000012/` holding
    tensors.safetensors  trainable parameters ("param/<name>"), optimizer state ("optim/<i>/<key>"),
                         torch RNG states ("rng/torch", "rng/cuda/<d>"), numpy's key array ("rng/numpy")
    state.json           step, config, parameter order, optimizer hyper-parameters and scalar state,
                         python/numpy RNG scalars, the trainer's own state (KL coefficient, counters)
                         and digests of the run's inputs (model weights, data records)
It is built in a hidden temporary directory and renamed into place when complete, so a kill leaves either
no checkpoint or a whole one; `latest_checkpoint` only sees complete ones. PPO's result is save_policy's
policy.safetensors + policy.json (Hydra-SFT's is rlhf.sft.save_sft's).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hydra_kernels.integrations.checkpoint import write_dir_atomically   # re-exported: rlhf writes its results with it
from hydra_kernels.integrations.fsdp import full_state_dict, load_full_, refuse_zero3
from hydra_kernels.rlhf.config import config_to_dict

FORMAT = "hydra_kernels.rlhf.checkpoint"
VERSION = 1
PREFIX = "step-"
CHECKPOINT_MARKER = "state.json"        # the kind write_dir_atomically records in a checkpoint's directory


# ------------------------------------------------------------------------------------------ RNG states
def capture_rng() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensor part) of every RNG the run may touch: python, torch CPU/CUDA, numpy if imported."""
    meta: dict = {"python": _jsonable(random.getstate())}
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for d, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{d}"] = s
    np = sys.modules.get("numpy")
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        tensors["rng/numpy"] = torch.from_numpy(keys.astype("int64"))
        meta["numpy"] = [kind, int(pos), int(has_gauss), float(cached)]
    return meta, tensors


def restore_rng(meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    random.setstate(_tupled(meta["python"]))
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted((k for k in tensors if k.startswith("rng/cuda/")), key=lambda k: int(k.rsplit("/", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][:torch.cuda.device_count()])
    if "numpy" in meta and "rng/numpy" in tensors:
        import numpy as np
        kind, pos, has_gauss, cached = meta["numpy"]
        np.random.set_state((kind, tensors["rng/numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tupled(x):
    return tuple(_tupled(v) for v in x) if isinstance(x, list) else x


# ------------------------------------------------------------------------------------ optimizer state
def flatten_optimizer(optimizer: torch.optim.Optimizer | dict) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON part, tensors) of optimizer.state_dict() (or of that state dict itself, e.g. gathered by
    integrations.fsdp.full_optimizer_state): tensors go to safetensors, everything else to JSON."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optim/{idx}/{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return {"param_groups": sd["param_groups"], "scalars": scalars}, tensors


def unflatten_optimizer(meta: dict, tensors: dict[str, torch.Tensor]) -> dict:
    state: dict = {}
    for key, t in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = t
    for idx, st in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(st)
    return {"state": state, "param_groups": meta["param_groups"]}


# ------------------------------------------------------------------------------------------ checkpoints
@dataclass
class Checkpoint:
    path: Path
    step: int
    params: dict[str, torch.Tensor]
    optimizer_state: dict
    config: dict
    trainer_state: dict
    rng_meta: dict
    rng_tensors: dict[str, torch.Tensor]


def save_checkpoint(root: str | os.PathLike, step: int, params: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer | dict, config: dict, trainer_state: dict,
                    keep: int = 2) -> Path:
    """Write checkpoint `root/step-<step>` atomically and delete all but the newest `keep`. Checkpoints of later
    steps than `step` are deleted too: they belong to an earlier run in the same root (a run writes increasing
    steps, and a resumed one continues from the latest), and would otherwise outrank this one, which pruning
    by step would delete at once and `latest_checkpoint` would pass over on the next resume. params and
    optimizer (or its state dict) hold whole tensors: under FSDP2 gather them first (Run.checkpoint)."""
    if keep < 1:
        raise ValueError(f"keep: must be >= 1, got {keep}")
    for name, p in params.items():
        if not torch.isfinite(p).all():
            raise ValueError(f"params: {name!r} is not finite; refusing to checkpoint NaN/inf weights")
    opt_meta, opt_tensors = flatten_optimizer(optimizer)
    rng_meta, rng_tensors = capture_rng()
    tensors = {f"param/{k}": v for k, v in params.items()}
    tensors.update(opt_tensors)
    tensors.update(rng_tensors)
    state = {"format": FORMAT, "version": VERSION, "step": int(step), "param_names": list(params),
             "optimizer": opt_meta, "config": config, "trainer_state": trainer_state, "rng": rng_meta}

    def fill(tmp: Path):
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp / "tensors.safetensors"))
        with open(tmp / "state.json", "w") as f:       # written last: its presence marks a complete checkpoint
            json.dump(state, f, indent=1, sort_keys=True)

    root = Path(root)
    out = write_dir_atomically(root / f"{PREFIX}{step:08d}", fill, marker=CHECKPOINT_MARKER)
    found = list_checkpoints(root)
    mine = found.index(out)
    for old in found[:max(mine + 1 - keep, 0)] + found[mine + 1:]:
        shutil.rmtree(old, ignore_errors=True)
    return out


class CheckpointSchedule:
    """When a training loop checkpoints: after every `every` steps (0 = not by count) and after the first step
    that ends `minutes` or more after the previous checkpoint (or the start; 0 = not by time), so a killed run
    loses at most about that much work whatever a step costs. Resume is exact wherever checkpoints fall."""

    def __init__(self, every: int, minutes: float, clock: Callable[[], float] = time.monotonic):
        self.every, self.seconds, self.clock = every, 60.0 * minutes, clock
        self.last = clock()

    def due(self, done: int) -> bool:
        by_count = bool(self.every) and done % self.every == 0
        return by_count or (self.seconds > 0 and self.clock() - self.last >= self.seconds)

    def saved(self) -> None:
        self.last = self.clock()


# Settings a resumed run may change: how long, where, on how many processes and how visibly it runs, and where
# its inputs live; not what a step computes (activation checkpointing and lean activations give bitwise the same
# gradients; the world size changes only the fp32 reduction order). Anything else would make
# the resumed run silently differ from the one checkpointed: e.g. torch restores the optimizer's learning
# rates from the checkpoint, so a changed lr would otherwise be ignored without a word.
RESUMABLE_CHANGES = frozenset({
    "steps", "epochs", "model.path", "model.tokenizer_path", "model.activation_checkpointing", "model.lean_activations",
    "data.sft_path", "data.preference_path", "data.prompt_path",
    "run.output_dir", "run.device", "run.checkpoint_every", "run.checkpoint_minutes", "run.keep_checkpoints",
    "run.resume", "run.progress", "run.metrics_file", "run.report_to", "run.threads", "model.trust_remote_code",
    "model.allow_untested", "run.parallel", "world_size"})


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _as_stored(config: dict) -> dict:
    return json.loads(json.dumps(_jsonable(config)))           # tuples become lists, as in state.json


def check_resume_config(saved: dict, current: dict, checkpoint: str | os.PathLike,
                        defaults: dict | None = None) -> None:
    """ValueError naming every setting (outside RESUMABLE_CHANGES) in which `current` differs from the config
    stored with `checkpoint`. A setting the stored config lacks (added to the library since) counts as having
    its value in `defaults`, the config class's defaults, which keep the behaviour it had before."""
    a, b = _flat(saved), _flat(_as_stored(current))
    a = {**{k: v for k, v in _flat(_as_stored(defaults or {})).items() if k not in a}, **a}
    diffs = [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b))
             if k not in RESUMABLE_CHANGES and a.get(k) != b.get(k)]
    if diffs:
        raise ValueError(f"run.output_dir: {str(checkpoint)!r} is a checkpoint of a run with other settings ("
                         + "; ".join(diffs) + "). Resume with the same settings, or use another run.output_dir "
                         "or run.resume=false")


def inputs_digest(*, modules: dict | None = None, data: dict | None = None, values: int = 1024) -> dict[str, str]:
    """Short digests of what a run starts from, keyed by the setting that names it (e.g. "model.path",
    "data.prompt_path"): for each module, its parameters' names, shapes, dtypes and up to `values` evenly
    spaced entries each (cheap even for a large model, and independent of its device); for each data entry, every
    record. Stored with checkpoints so that a run on other inputs is not resumed from them (`check_resume_inputs`).
    Each module also gets one entry per parameter, "<name>/<parameter>", so that a refusal names the tensors
    that differ."""
    import hashlib
    out, parts = {}, {}
    for name, module in (modules or {}).items():
        h = hashlib.sha256()
        with torch.no_grad():
            for pname, p in module.named_parameters():
                flat = p.detach().reshape(-1)
                n = flat.numel()
                if n > values:
                    flat = flat[torch.linspace(0, n - 1, values, device=flat.device).round().long()]
                head, entries = f"{pname}:{tuple(p.shape)}:{p.dtype};".encode(), flat.float().cpu().numpy().tobytes()
                h.update(head)
                h.update(entries)
                parts[f"{name}/{pname}"] = hashlib.sha256(head + entries).hexdigest()[:16]
        out[name] = h.hexdigest()[:16]
    for name, records in (data or {}).items():
        h = hashlib.sha256()
        for r in records:
            h.update(repr(r).encode("utf-8", "surrogatepass") + b"\n")
        out[name] = h.hexdigest()[:16]
    return {**out, **parts}


def check_resume_inputs(saved: dict | None, current: dict[str, str], checkpoint: str | os.PathLike) -> None:
    """ValueError naming each input whose digest differs from the one stored with `checkpoint`, and for a
    module the parameters that differ, where the checkpoint stored theirs (older checkpoints store no digests:
    nothing to check)."""
    diffs = [k for k in current if "/" not in k and saved and k in saved and saved[k] != current[k]]
    if diffs:
        def detail(k):
            if not any(p.startswith(k + "/") for p in saved):
                return f"{k}: other contents"
            params = [p.split("/", 1)[1] for p in current if p.startswith(k + "/") and p in saved
                      and saved[p] != current[p]]
            gone = sorted({p.split("/", 1)[1] for p in set(saved) ^ set(current) if p.startswith(k + "/")})
            what = [f"parameters {', '.join(params[:3])}{' ...' if len(params) > 3 else ''} differ"] if params else []
            what += [f"parameters {', '.join(gone[:3])}{' ...' if len(gone) > 3 else ''} only on one side"] if gone \
                else []
            return f"{k}: other contents" + (f" ({'; '.join(what)})" if what else "")
        raise ValueError(f"run.output_dir: {str(checkpoint)!r} is a checkpoint of a run that started from other "
                         f"inputs ({'; '.join(detail(k) for k in diffs)}). Use another run.output_dir, or "
                         f"run.resume=false to replace that run")


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit() \
                and (d / "state.json").is_file() and (d / "tensors.safetensors").is_file():
            found.append((int(d.name[len(PREFIX):]), d))
    return [d for _, d in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def check_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer, source: str | os.PathLike) -> None:
    """ValueError (naming `source`'s file and the field) unless an optimizer state_dict read from a checkpoint
    fits `optimizer`, the one this run built from its own config: the same groups and parameter counts, the
    same hyper-parameters (lr, betas, eps, weight_decay, ...: numbers; an lr a scheduler moves is compared by its
    initial_lr), and state tensors of their parameter's shape, finite. Otherwise a value edited in state.json
    would be used silently, and a state of the wrong shape crash a step later."""
    state_file, tensor_file = Path(source) / "state.json", Path(source) / "tensors.safetensors"
    fresh = optimizer.state_dict()["param_groups"]
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(fresh):
        raise ValueError(f"{str(state_file)!r}: field optimizer.param_groups holds "
                         f"{len(groups) if isinstance(groups, list) else groups!r} groups, this run has {len(fresh)}")

    def hyper(v):
        if isinstance(v, (list, tuple)):
            return all(hyper(x) for x in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def same(a, b):
        return [*a] == [*b] if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b
    for g, (have, want) in enumerate(zip(groups, fresh)):
        if not isinstance(have, dict) or len(have.get("params", ())) != len(want["params"]):
            raise ValueError(f"{str(state_file)!r}: field optimizer.param_groups[{g}].params does not match this "
                             f"run's {len(want['params'])} parameters")
        for key, value in want.items():
            if key == "params" or not hyper(value) or (key == "lr" and "initial_lr" in want):
                continue
            if key not in have or not same(have[key], value):
                raise ValueError(f"{str(state_file)!r}: field optimizer.param_groups[{g}].{key} is "
                                 f"{have.get(key)!r}, this run's settings give {value!r}; a checkpoint's optimizer "
                                 f"settings must be the run's own")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, st in saved.get("state", {}).items():
        if not 0 <= int(idx) < len(params):
            raise ValueError(f"{str(tensor_file)!r}: optimizer state for parameter {idx}, this run has "
                             f"{len(params)}")
        shape = tuple(params[int(idx)].shape)
        for key, t in st.items():
            if not torch.is_tensor(t):
                continue
            if t.dim() and tuple(t.shape) != shape:
                raise ValueError(f"{str(tensor_file)!r}: tensor 'optim/{idx}/{key}' has shape {tuple(t.shape)}, "
                                 f"its parameter {shape}")


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    path = Path(path)
    try:
        with open(path / "state.json") as f:
            state = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"path: {str(path)!r} is not a readable checkpoint: {e}") from None
    if state.get("format") != FORMAT:
        raise ValueError(f"path: {str(path)!r} is not a {FORMAT} checkpoint")
    try:
        with safe_open(str(path / "tensors.safetensors"), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:                    # safetensors raises its own SafetensorError (and OSError)
        raise ValueError(f"path: {str(path)!r} is not a readable checkpoint: tensors.safetensors: {e}") from None
    for key, t in tensors.items():            # weights and optimizer moments; save_checkpoint writes none
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"path: tensor {key!r} in {str(path / 'tensors.safetensors')!r} holds NaN or inf "
                             f"values")
    params = {k[len("param/"):]: v for k, v in tensors.items() if k.startswith("param/")}
    return Checkpoint(path, state["step"], params, unflatten_optimizer(state["optimizer"], tensors),
                      state["config"], state["trainer_state"], state["rng"],
                      {k: v for k, v in tensors.items() if k.startswith("rng/")})


def copy_params_(target: dict[str, torch.nn.Parameter], saved: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved tensors into parameters after checking names and shapes (nothing changes on error)."""
    refuse_zero3(target.values(), "resuming")
    missing = [k for k in target if k not in saved]
    extra = [k for k in saved if k not in target]
    if missing or extra:
        raise ValueError(f"{source}: parameters do not match the model (missing {missing[:3]}, unexpected "
                         f"{extra[:3]}); was it written by another variant or LoRA configuration?")
    for k, p in target.items():
        if tuple(saved[k].shape) != tuple(p.shape):
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(saved[k].shape)}, the model expects "
                             f"{tuple(p.shape)}")
    for k, p in target.items():
        load_full_(p, saved[k])                 # a parameter FSDP2 shards: this rank's part of it


# ------------------------------------------------------------------------------------- PPO's result
def policy_tensors(models) -> dict[str, torch.Tensor]:
    """What save_policy writes: named_trainable() and the reward head, whole (collective under FSDP2: every
    rank calls it), on the CPU."""
    tensors = dict(models.named_trainable())
    tensors.update({f"reward_head.{n}": p for n, p in models.reward_head.named_parameters()})
    return {k: v.contiguous() for k, v in full_state_dict(tensors).items()}


def save_policy(out_dir: str | os.PathLike, models, cfg, extra: dict | None = None, *,
                tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """The trained PPO state of `models` (a models.PPOModels: its named_trainable() tensors, i.e. the
    actor/critic adapters or weights and the value head, and the reward head) as policy.safetensors +
    policy.json (variant, config `cfg`, `extra`), written atomically. Load it with `load_policy`. Raises
    ValueError for a non-finite tensor (nothing is written). tensors: policy_tensors(models), when gathered
    beforehand (under FSDP2 on every rank, before rank 0 alone writes)."""
    tensors = policy_tensors(models) if tensors is None else tensors
    for k, v in tensors.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"models: {k!r} is not finite; refusing to save NaN/inf weights")
    meta = {"format": "hydra_kernels.rlhf.policy", "variant": models.variant, "config": config_to_dict(cfg),
            **(extra or {})}

    def fill(tmp: Path):
        save_file(tensors, str(tmp / "policy.safetensors"))
        with open(tmp / "policy.json", "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
    return write_dir_atomically(out_dir, fill, marker="policy.json")


def load_policy(path: str | os.PathLike, models) -> dict:
    """Load save_policy's tensors into `models` built with the same variant and LoRA settings; returns the
    JSON. Raises ValueError (nothing changes) for a directory without a saved policy, another variant, or
    tensors of other names or shapes."""
    from hydra_kernels.integrations.checkpoint import load_safetensors
    path = Path(path)
    try:
        with open(path / "policy.json") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"path: {str(path)!r} holds no saved policy: {e}") from None
    tensors, _ = load_safetensors(path / "policy.safetensors", name="path")      # NaN / inf refused too
    if meta.get("variant") != models.variant:
        raise ValueError(f"path: saved variant {meta.get('variant')!r} does not match the models' {models.variant!r}")
    target = dict(models.named_trainable())
    target.update({f"reward_head.{n}": p for n, p in models.reward_head.named_parameters()})
    copy_params_(target, tensors, str(path))
    return meta


__all__ = ["CHECKPOINT_MARKER", "Checkpoint", "save_checkpoint", "load_checkpoint", "check_optimizer_state",
           "latest_checkpoint", "list_checkpoints", "capture_rng", "restore_rng", "flatten_optimizer", "unflatten_optimizer", "copy_params_",
           "write_dir_atomically", "CheckpointSchedule", "check_resume_config", "RESUMABLE_CHANGES",
           "inputs_digest", "check_resume_inputs", "policy_tensors", "save_policy", "load_policy"]
