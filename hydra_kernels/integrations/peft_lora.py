"""PEFT interop: export one adapter as a PEFT LoRA directory, import a PEFT LoRA directory into one adapter.

PEFT's on-disk layout (no peft import needed to write or read it):
  adapter_config.json          peft_type "LORA", r, lora_alpha, target_modules, fan_in_fan_out, ...
  adapter_model.safetensors    base_model.model.<module path>.lora_A.weight [r, in]
                               base_model.model.<module path>.lora_B.weight [out, r]
with <module path> relative to the causal LM. PEFT's scaling is lora_alpha / r (use_rslora off), as here.
GPT-2's Conv1D layers use the same A/B shapes; PEFT only transposes the merged delta (fan_in_fan_out=True).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from torch import nn

from hydra_kernels.integrations import checkpoint as ckpt
from hydra_kernels.integrations.fsdp import any_sharded, copy_row_, full_tensor, on_rank0, refuse_zero3, write_once
from hydra_kernels.integrations.patch import hydra_modules, patch_info

__all__ = ["export_peft", "import_peft", "PEFT_CONFIG_NAME", "PEFT_WEIGHTS_NAME"]

PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# Results of other writers that an export must never replace (a model, a Hydra checkpoint, SFT / PPO results).
PEFT_FOREIGN = ("config.json", "hydra_config.json", "sft.json", "policy.json", "state.json")
_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.weight$")


def _target_modules(model: nn.Module, paths: tuple[str, ...]):
    """Leaf names if they select exactly the patched modules (the usual, readable form), else an exact regex.

    peft matches a list entry on the full path or a suffix at a module boundary, and a string as re.fullmatch.
    """
    leaves = sorted({p.rsplit(".", 1)[-1] for p in paths})
    selected = {p for p, _ in model.named_modules() if p and p.rsplit(".", 1)[-1] in leaves}
    if selected == set(paths):
        return leaves
    return "(?:" + "|".join(re.escape(p) for p in paths) + ")"


def export_peft(model: nn.Module, adapter: str, out_dir) -> Path:
    """Write `adapter` of a patched model as a PEFT LoRA directory (adapter_config.json +
    adapter_model.safetensors). Its base_model_name_or_path is the absolute path of the directory that holds
    the model's base weights as they are in memory (loading.base_directory), so peft's
    AutoPeftModelForCausalLM.from_pretrained(out_dir) gives this adapter's stream, as does
    PeftModel.from_pretrained(base, out_dir) on that base.

    A model whose base is in no directory (built in memory, or with an adapter merged into it in place, as
    Hydra-SFT does, since it was loaded) is refused: the directory it came from holds another model. Write the
    base first with HydraModel.merge(None, dir) / save_merged(model, None, dir), which makes dir its base.
    The directory is written atomically as a whole; an existing out_dir is replaced only if it is an earlier
    export (checkpoint.check_replaceable). Returns out_dir as a Path.
    Raises ValueError naming adapter, model or out_dir.
    """
    from hydra_kernels.integrations.loading import base_directory
    info = patch_info(model)
    if adapter not in info.adapters:
        raise ValueError(f"adapter: {adapter!r} is not one of the model's adapters {info.adapters}")
    # Under FSDP2 rank 0's verdict (the rank that writes) holds for every rank, so all go on or all raise.
    base, why = (on_rank0(lambda: base_directory(model), what="export_peft", share=True) if any_sharded(model)
                 else base_directory(model))
    if base is None:
        raise ValueError(f"model: no directory on disk holds this model's base weights ({why}), so the exported "
                         "adapter could name none (or the wrong one); write the base first with "
                         "HydraModel.merge(None, dir) or checkpoint.save_merged(model, None, dir), then export")
    tensors = {}
    for path, layer in hydra_modules(model).items():
        i = layer.stream_indices([adapter])[0]
        # Whole stacks: FSDP2 holds them sharded (an all-gather per stack; every rank takes part).
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = full_tensor(layer.lora_A).detach()[i]
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = full_tensor(layer.lora_B).detach()[i]
    alpha = int(info.alpha) if float(info.alpha).is_integer() else info.alpha
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None, "inference_mode": True,
        "r": info.r, "lora_alpha": alpha, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
        "target_modules": _target_modules(model, info.modules),
        # PEFT sets this itself for Conv1D targets (with a warning if it was False); say it up front.
        "fan_in_fan_out": bool(info.conv1d),
        "bias": "none", "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    cpu = {k: v.to("cpu", copy=True).contiguous() for k, v in tensors.items()}

    def fill(tmp: Path) -> None:
        from safetensors.torch import save_file
        save_file(cpu, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        with open(tmp / PEFT_CONFIG_NAME, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
    # Under FSDP2: written by rank 0, its outcome on every rank (integrations.fsdp.write_once).
    return write_once(model, lambda: ckpt.write_dir_atomically(out_dir, fill, marker=PEFT_CONFIG_NAME,
                                                               foreign=PEFT_FOREIGN),
                      what="export_peft") or Path(out_dir)


def _config_error(where: str, key: str, value, what: str) -> ValueError:
    return ValueError(f"peft_dir: {where}: field {key!r} must be {what}, got {value!r}")


def _check_config(cfg: dict, info, where: str) -> None:
    if not isinstance(cfg, dict):
        raise ValueError(f"peft_dir: {where} holds a JSON {type(cfg).__name__}, expected an object")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"peft_dir: {where} has peft_type {cfg.get('peft_type')!r}; only LORA adapters import")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise _config_error(where, "r", r, "a positive int")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(cfg.get(key) or {}, dict):
            raise _config_error(where, key, cfg.get(key), "an object {module pattern: value}")
    ranks = list((cfg.get("rank_pattern") or {}).values())
    if any(isinstance(v, bool) or not isinstance(v, int) for v in ranks):
        raise _config_error(where, "rank_pattern", cfg.get("rank_pattern"), "a map to positive ints")
    alphas = [cfg.get("lora_alpha")] + list((cfg.get("alpha_pattern") or {}).values())
    for i, a in enumerate(alphas):
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            raise _config_error(where, "alpha_pattern" if i else "lora_alpha", a, "a finite positive number")
    if r != info.r or any(v != info.r for v in ranks):
        raise ValueError(f"peft_dir: {where} has rank r={r} (rank_pattern {cfg.get('rank_pattern') or {}}); "
                         f"the model's adapters have r={info.r}")
    if any(float(a) != info.alpha for a in alphas):
        raise ValueError(f"peft_dir: {where} has lora_alpha={cfg.get('lora_alpha')} (alpha_pattern "
                         f"{cfg.get('alpha_pattern') or {}}); the model's adapters have alpha={info.alpha:g}")
    if cfg.get("use_rslora"):
        raise ValueError(f"peft_dir: {where} uses rsLoRA (scaling alpha/sqrt(r)); the model scales by alpha/r")
    if cfg.get("use_dora"):
        raise ValueError(f"peft_dir: {where} is a DoRA adapter (magnitude vectors); not supported")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise ValueError(f"peft_dir: {where} trains biases (bias={cfg.get('bias')!r}); the base stays frozen here")
    if cfg.get("modules_to_save"):
        raise ValueError(f"peft_dir: {where} has modules_to_save {cfg['modules_to_save']}; full-module copies "
                         "(heads) are not imported: heads are switched explicitly here")


def import_peft(model: nn.Module, adapter: str, peft_dir) -> None:
    """Load a PEFT LoRA directory into `adapter` of a patched model.

    Rank and alpha must match the model's. Patched modules the PEFT adapter does not target get a zero delta
    (B = 0) for this adapter. Everything is checked before anything is written: a bad or mistyped
    adapter_config.json field, a truncated or non-safetensors weights file, a tensor of the wrong name, shape
    or dtype, or NaN / inf values raise ValueError naming peft_dir, the file and the field or tensor.
    """
    info = patch_info(model)
    if adapter not in info.adapters:
        raise ValueError(f"adapter: {adapter!r} is not one of the model's adapters {info.adapters}")
    refuse_zero3(model.parameters(), "import_peft")
    peft_dir = Path(peft_dir)
    cfg_path, weights = peft_dir / PEFT_CONFIG_NAME, peft_dir / PEFT_WEIGHTS_NAME
    if not cfg_path.is_file():
        raise ValueError(f"peft_dir: {str(peft_dir)!r} has no {PEFT_CONFIG_NAME}")
    if not weights.is_file():
        extra = " (adapter_model.bin is a pickle and is not loaded)" if (peft_dir / "adapter_model.bin").exists() else ""
        raise ValueError(f"peft_dir: {str(peft_dir)!r} has no {PEFT_WEIGHTS_NAME}{extra}")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"peft_dir: {str(cfg_path)!r} is not readable JSON ({' '.join(str(e).split())})") from None
    _check_config(cfg, info, repr(str(cfg_path)))
    tensors, _ = ckpt.load_safetensors(weights, name="peft_dir")
    layers = hydra_modules(model)
    found: dict[tuple[str, str], torch.Tensor] = {}
    for key, t in tensors.items():
        rest = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        m = _KEY.match(rest)
        if m is None:
            raise ValueError(f"peft_dir: tensor {key!r} in {str(weights)!r} is not a LoRA A/B weight "
                             "(embeddings, magnitude vectors, biases and saved modules are not imported)")
        path = m["path"]
        if path not in layers:
            raise ValueError(f"peft_dir: tensor {key!r}: module {path!r} is not a patched layer of this model")
        layer = layers[path]
        if not t.is_floating_point():
            raise ValueError(f"peft_dir: tensor {key!r} in {str(weights)!r} has dtype {t.dtype}; LoRA weights are "
                             "floating point")
        want = (info.r, layer.in_features) if m["which"] == "A" else (layer.out_features, info.r)
        if tuple(t.shape) != want:
            raise ValueError(f"peft_dir: tensor {key!r} has shape {tuple(t.shape)}, expected {want} "
                             f"(rank {info.r}, layer {layer.in_features}->{layer.out_features})")
        found[(path, m["which"])] = t
    paths = {p for p, _ in found}
    for p in paths:
        for which in "AB":
            if (p, which) not in found:
                raise ValueError(f"peft_dir: {str(weights)!r} has no lora_{which} for module {p!r}")
    if not paths:
        raise ValueError(f"peft_dir: {str(weights)!r} holds no LoRA weights")
    with torch.no_grad():
        for path, layer in layers.items():
            i = layer.stream_indices([adapter])[0]
            # copy_row_: into this rank's part where FSDP2 shards the stack.
            if path in paths:
                copy_row_(layer.lora_A, i, found[(path, "A")])
                copy_row_(layer.lora_B, i, found[(path, "B")])
            else:
                copy_row_(layer.lora_B, i, torch.zeros(layer.lora_B.shape[1:]))
