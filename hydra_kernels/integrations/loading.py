"""Loading transformers models from local directories: safetensors only, nothing executed; which directory holds
a model's base weights; a tokenizer that fits the model's embedding.

transformers is imported lazily, inside the functions that need it.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from hydra_kernels.integrations.fsdp import is_sharded, is_zero3, local_part, local_tensor
from hydra_kernels.integrations.patch import MERGED_CONFIG_KEY, PatchInfo, hydra_modules, merged_adapters

__all__ = ["load_causal_lm", "check_safetensors_dir", "base_directory", "check_tokenizer_fits"]

# Weight files transformers would load with pickle (torch.load) or through other frameworks.
_OTHER_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack")


def dtype_kwarg() -> str:
    """transformers renamed from_pretrained's torch_dtype to dtype in 4.56."""
    import transformers
    from packaging.version import Version
    return "dtype" if Version(transformers.__version__.split("+")[0]) >= Version("4.56") else "torch_dtype"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def check_safetensors_dir(path, name: str = "path") -> Path:
    """path as a Path if it is a local transformers model directory with safetensors weights, else ValueError
    naming `name` and the path. A directory with only pickle weights (pytorch_model.bin, ...) is refused with
    the command that converts it (loading a pickle can execute code; safetensors cannot)."""
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is not a local model directory (nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise ValueError(f"{name}: {str(path)!r} has no config.json; not a transformers model directory")
    files = sorted(f.name for f in p.iterdir() if f.is_file())
    if any(f.endswith((".safetensors", ".safetensors.index.json")) for f in files):
        return p
    pickles = [f for f in files if f.endswith(_OTHER_WEIGHT_SUFFIXES) or f.endswith(".bin.index.json")]
    if pickles:
        raise ValueError(
            f"{name}: {str(path)!r} holds only pickle weights ({pickles[0]}); hydra_kernels loads safetensors only, "
            "since loading a pickle can execute code. If you trust the file, convert it once: python -c "
            f"\"from transformers import AutoModelForCausalLM; "
            f"AutoModelForCausalLM.from_pretrained({str(p)!r}).save_pretrained({str(p)!r})\" "
            "(writes model.safetensors next to it)")
    raise ValueError(f"{name}: {str(path)!r} has no model.safetensors (nor a sharded model.safetensors.index.json)")


def load_causal_lm(path, *, name: str = "path", dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                   **load_kwargs) -> nn.Module:
    """AutoModelForCausalLM from a local directory, from its safetensors weights only (use_safetensors=True,
    local_files_only=True). Modelling code shipped in the directory runs only with trust_remote_code=True (the
    model.trust_remote_code setting); pickle weights never load.

    path: the model directory (check_safetensors_dir). name: the argument or setting named in errors.
    dtype: the load dtype (None: transformers' default). load_kwargs: passed to from_pretrained.
    Returns the model with config.name_or_path set to the directory's absolute path (so what names the model's
    base later, e.g. export_peft, does not depend on the working directory).
    Raises ValueError naming `name` and the path: not a model directory, pickle weights only, unreadable or
    truncated weights, or a bad config.json.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    if load_kwargs.get("use_safetensors", True) is not True:
        raise ValueError(f"{name}: use_safetensors must stay True (pickle weights are never loaded)")
    p = check_safetensors_dir(path, name)
    load_kwargs.update(use_safetensors=True, local_files_only=True, trust_remote_code=bool(trust_remote_code))
    if dtype is not None:
        load_kwargs[dtype_kwarg()] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(str(p), **load_kwargs)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        raise ValueError(f"{name}: cannot load a model from {str(path)!r}: {_one_line(e)}") from None
    model.config.name_or_path = str(p.resolve())
    return model


def _disk_tensor(directory: Path, key: str) -> torch.Tensor | None:
    """Tensor `key` of the model directory's safetensors weights (single file or sharded), or None."""
    from safetensors import safe_open
    index = directory / "model.safetensors.index.json"
    try:
        if index.is_file():
            with open(index) as f:
                file = json.load(f)["weight_map"].get(key)
            if file is None:
                return None
        else:
            file = "model.safetensors"
        with safe_open(str(directory / file), framework="pt") as f:
            return f.get_tensor(key) if key in f.keys() else None
    except Exception:        # an unreadable directory proves nothing either way; the checks above still hold
        return None


def base_directory(model: nn.Module) -> tuple[str | None, str]:
    """(absolute path of the local directory that holds `model`'s base weights as they are in memory, "") or
    (None, why not), read from config.name_or_path (set by from_pretrained, load_causal_lm and
    save_merged(model, None, dir)).

    The directory must be a model directory whose config.json records the same merged adapters
    (config.hydra_merged_adapters: merge_adapter_into_base changes the weights in memory only), model type and
    vocabulary size (a resized embedding) as the model, and, for a patched model, whose first patched layer's
    weight equals the one in memory.
    """
    cfg = getattr(model, "config", None)
    named = getattr(cfg, "name_or_path", None) or ""
    if not named:
        return None, "it was not loaded from a directory (built in memory)"
    directory = Path(named)
    if not (directory / "config.json").is_file():
        return None, f"its config names {named!r}, which is no local model directory (from here)"
    directory = directory.resolve()
    try:
        with open(directory / "config.json") as f:
            disk = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"{str(directory / 'config.json')!r} is unreadable ({_one_line(e)})"
    if not isinstance(disk, dict):
        return None, f"{str(directory / 'config.json')!r} is not a JSON object"
    on_disk, in_memory = list(disk.get(MERGED_CONFIG_KEY) or []), list(merged_adapters(model))
    if on_disk != in_memory:
        return None, (f"adapters {in_memory} are merged into its base in memory, {on_disk} in {str(directory)!r} "
                      "(merged in place since it was loaded)")
    for key in ("model_type", "vocab_size"):
        if key in disk and getattr(cfg, key, None) is not None and disk[key] != getattr(cfg, key):
            return None, (f"its config.{key} is {getattr(cfg, key)!r}, {disk[key]!r} in {str(directory)!r} "
                          "(changed since it was loaded)")
    info = getattr(model, "hydra_patch", None)
    if isinstance(info, PatchInfo) and info.modules:
        path = info.modules[0]
        weight = hydra_modules(model)[path].weight
        saved = _disk_tensor(directory, f"{path}.weight")
        if saved is not None:
            saved = saved.t() if path in info.conv1d else saved
            mem = weight.detach()
            if is_sharded(weight) or is_zero3(weight):   # this rank's part, compared without communication
                saved, mem = local_part(saved, weight), local_tensor(weight)
            if tuple(saved.shape) != tuple(mem.shape) or not torch.equal(saved.to(mem.dtype), mem.cpu()):
                return None, (f"its weight {path!r} differs from the one in {str(directory)!r} (the base was "
                              "changed in memory, or the directory was rewritten, since it was loaded)")
    return str(directory), ""


def check_tokenizer_fits(tokenizer, model: nn.Module, name: str = "tokenizer") -> None:
    """ValueError naming `name` if the tokenizer can produce a token id the model has no embedding row for
    (len(tokenizer) or a special token id >= the input embedding's rows, or beyond the LM head's): such an id
    fails inside the embedding (on CUDA as a device-side assert) or is never sampled. Call it after adding
    tokens (add_pad_token resizes the embeddings) and before training."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"model: {type(model).__name__} has no input embedding to check the tokenizer against")
    rows = {"input embedding": weight.shape[0]}
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if isinstance(getattr(head, "weight", None), torch.Tensor):
        rows["LM head"] = head.weight.shape[0]
    try:
        size = len(tokenizer)
    except TypeError:
        raise ValueError(f"{name}: expected a tokenizer (len(tokenizer) = its vocabulary size), "
                         f"got {type(tokenizer).__name__}") from None
    for what, n in rows.items():
        if size > n:
            raise ValueError(f"{name}: its vocabulary has {size} tokens, the model's {what} only {n} rows, so "
                             f"token ids >= {n} have no row; resize it (model.resize_token_embeddings(len(tokenizer))"
                             ", as add_pad_token does) or use the model's own tokenizer")
        for attr in ("pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id"):
            v = getattr(tokenizer, attr, None)
            if isinstance(v, int) and not 0 <= v < n:
                raise ValueError(f"{name}: {attr}={v} is out of range for the model's {what} of {n} rows")
