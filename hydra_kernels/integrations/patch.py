"""Patch a Hugging Face decoder in place: its projections become HydraLinear layers sharing the original weights.

transformers is imported lazily (only GPT-2's Conv1D class is needed here), so `import hydra_kernels` stays light.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from hydra_kernels.integrations.fsdp import full_shape, gathered_call
from hydra_kernels.nn.linear import BASE, HydraLinear
from hydra_kernels.nn.streams import streams as streams_context
from hydra_kernels.ops import check_lora_args, plain_eager

__all__ = ["patch_model", "unpatch_model", "PatchInfo", "patch_info", "merged_adapters", "hydra_modules",
           "repeat_for_streams", "decoder_forward", "validate_streams", "position_ids_from_attention_mask",
           "disable_dropout", "DROPOUT_MODULES", "SUPPORTED_MODEL_TYPES", "cache_kwarg", "output_cache",
           "check_token_ids"]

# Architectures whose every patched projection sees the whole batch (a requirement of the stream layout) and
# that the test suite covers. Others are refused unless the caller opts in with allow_untested=True.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2", "gpt_neox")

# Output heads are never patched: the LM head goes through ops.linear_logprobs, reward and value heads are
# switched explicitly per stream (peft's modules_to_save pitfall). Matched on the module's last name.
_HEAD_NAMES = frozenset({"lm_head", "embed_out", "score", "classifier", "v_head", "value_head", "reward_head",
                         "summary", "qa_outputs"})

# Config attributes that signal mixture-of-experts routing: expert projections run on gathered subsets of rows,
# so the row blocks of the stream layout no longer line up with the streams.
_MOE_CONFIG_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class PatchInfo:
    """What patch_model did; stored on the model as `model.hydra_patch`.

    modules: paths (relative to the patched model) of the HydraLinear layers, in module order.
    conv1d: the subset that replaced GPT-2-style Conv1D layers (weight stored [in, out]; now [out, in]).
    merged: adapters folded into the base weights (merge_adapter_into_base), oldest first. Kept in the model's
        config too (`config.hydra_merged_adapters`), so merged directories and re-patched models carry it and
        a checkpoint trained on a merged base refuses a base without that merge.
    """
    adapters: tuple[str, ...]
    r: int
    alpha: float
    modules: tuple[str, ...]
    conv1d: frozenset[str] = frozenset()
    merged: tuple[str, ...] = field(default=())

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


MERGED_CONFIG_KEY = "hydra_merged_adapters"


def merged_adapters(model: nn.Module) -> tuple[str, ...]:
    """Adapters already folded into this model's base weights, oldest first (from its config)."""
    return tuple(getattr(getattr(model, "config", None), MERGED_CONFIG_KEY, None) or ())


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:          # transformers missing: no Conv1D layers can exist either
        return None
    return Conv1D


def patch_info(model: nn.Module) -> PatchInfo:
    """The PatchInfo of a model patched by patch_model (ValueError if it was not)."""
    info = getattr(model, "hydra_patch", None)
    if not isinstance(info, PatchInfo):
        raise ValueError(f"model: {type(model).__name__} is not patched (call hydra_kernels.patch_model first)")
    return info


def hydra_modules(model: nn.Module) -> dict[str, HydraLinear]:
    """{path: HydraLinear} of a patched model, in the order patch_model recorded them."""
    info = patch_info(model)
    out = {}
    for path in info.modules:
        layer = model.get_submodule(path)
        if not isinstance(layer, HydraLinear):
            raise ValueError(f"model: module {path!r} is {type(layer).__name__}, expected the HydraLinear "
                             "patch_model put there (was the model modified after patching?)")
        out[path] = layer
    return out


def _matches(path: str, target: str) -> bool:
    # peft's rule: the full path, or a suffix starting at a module boundary.
    return path == target or path.endswith("." + target)


def _output_head_ids(model: nn.Module) -> set[int]:
    ids = set()
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (AttributeError, NotImplementedError):
            head = None
        if head is not None:
            ids.add(id(head))
    return ids


def _linear_candidates(model: nn.Module):
    """(candidates {path: module}, refused {path: reason}) over the model minus its output heads."""
    conv1d = _conv1d_type()
    head_ids = _output_head_ids(model)
    candidates, refused, skip_prefixes = {}, {}, []
    for path, module in model.named_modules():
        if not path:
            continue
        if any(path.startswith(p) for p in skip_prefixes):
            continue
        if id(module) in head_ids or path.rsplit(".", 1)[-1] in _HEAD_NAMES:
            skip_prefixes.append(path + ".")
            continue
        if type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d):
            candidates[path] = module
        elif isinstance(module, HydraLinear):
            refused[path] = "already a HydraLinear (the model is already patched)"
        elif isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d)):
            # Subclasses (quantized layers such as bitsandbytes' Linear4bit, other LoRA wrappers) keep their
            # weight in another form or change forward; sharing `.weight` would be silently wrong.
            refused[path] = f"{type(module).__module__}.{type(module).__name__} is a subclass, not a plain layer"
    return candidates, refused


def _check_architecture(model: nn.Module, allow_untested: bool) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for key in _MOE_CONFIG_KEYS:
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 1:
            raise ValueError(f"model: {type(model).__name__} is a mixture-of-experts model (config.{key}={n}); "
                             "expert projections see gathered subsets of rows, which breaks the stream layout")
    if model_type in SUPPORTED_MODEL_TYPES or allow_untested:
        return
    what = f"model_type {model_type!r}" if model_type else "no config.model_type"
    raise ValueError(f"model: {type(model).__name__} has {what}, not one of the supported architectures "
                     f"{SUPPORTED_MODEL_TYPES}; pass allow_untested=True to patch it anyway (correct only if every "
                     "targeted projection runs on the whole batch, as in dense decoders)")


def _to_hydra(module: nn.Module, adapters, r, alpha, adapter_dtype) -> HydraLinear:
    if type(module) is nn.Linear:
        return HydraLinear.from_linear(module, adapters=adapters, r=r, alpha=alpha, adapter_dtype=adapter_dtype)
    # Conv1D stores its weight [in, out]. HydraLinear needs [out, in] contiguous, so the weight is transposed
    # once into a new Parameter that replaces the old one: the Conv1D module leaves the model with its [in, out]
    # tensor, which is freed as soon as nothing else refers to it. Peak extra memory is one layer's weight,
    # never a second copy of the model. The bias is shared as is.
    weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    shell = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None, device="meta")
    shell.weight = weight
    shell.bias = module.bias
    return HydraLinear.from_linear(shell, adapters=adapters, r=r, alpha=alpha, adapter_dtype=adapter_dtype)


def patch_model(model: nn.Module, adapters: Sequence[str] = ("actor", "critic"), r: int = 16, alpha: float = 32,
                target_modules: str | Iterable[str] = "all-linear", *, allow_untested: bool = False,
                adapter_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace the decoder's projections of `model` with HydraLinear layers, in place, and return the model.

    adapters: LoRA adapter names (each a stream; "base" is the stream with LoRA off); a sequence, never one str.
    r, alpha: LoRA rank (a positive int) and alpha (a finite positive number; scaling = alpha / r), the same for
        every layer and adapter.
    target_modules: "all-linear" (every nn.Linear / GPT-2 Conv1D outside the output heads) or a list of names,
        each matched on the module path or a suffix of it at a module boundary (as peft does: "q_proj",
        "self_attn.q_proj" or "model.layers.0.self_attn.q_proj").
    allow_untested: patch an architecture outside SUPPORTED_MODEL_TYPES (mixture-of-experts models are refused).
    adapter_dtype: None = fp32 adapters (master weights) on a bf16 / fp16 model, else the model's dtype.

    The weights are shared, not copied (Conv1D weights are transposed once; see _to_hydra). Every base parameter
    (embeddings, norms, heads included) is frozen; only the LoRA A/B stacks are trainable. The LM head and any
    reward/value/classification head are never patched. Each HydraLinear starts on its default stream (the first
    adapter); use hydra_kernels.streams(model, ...) or set_default_stream to choose.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: expected an nn.Module, got {type(model).__name__}")
    if isinstance(getattr(model, "hydra_patch", None), PatchInfo):
        raise ValueError(f"model: {type(model).__name__} is already patched (adapters {model.hydra_patch.adapters})")
    adapters, r, alpha = check_lora_args(adapters, r, alpha, reserved=(BASE,))
    _check_architecture(model, allow_untested)
    candidates, refused = _linear_candidates(model)

    if isinstance(target_modules, str):
        if target_modules != "all-linear":
            raise ValueError(f"target_modules: expected 'all-linear' or a list of module names, got {target_modules!r}")
        chosen = dict(candidates)
        bad = dict(refused)
    else:
        targets = list(target_modules)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target_modules: expected a non-empty list of module names, got {target_modules!r}")
        all_paths = [p for p, _ in model.named_modules() if p]
        heads = [t for t in targets if t.rsplit(".", 1)[-1] in _HEAD_NAMES]
        if heads:
            raise ValueError(f"target_modules: {heads} name output heads, which are never patched")
        missing = []
        chosen, bad = {}, {}
        for t in targets:
            hits = [p for p in candidates if _matches(p, t)]
            bad.update({p: why for p, why in refused.items() if _matches(p, t)})
            if not hits and not any(_matches(p, t) for p in refused):
                kinds = sorted({type(model.get_submodule(p)).__name__ for p in all_paths if _matches(p, t)})
                missing.append(f"{t!r}" + (f" (matches {kinds}, not nn.Linear/Conv1D)" if kinds else ""))
            chosen.update({p: candidates[p] for p in hits})
        if missing:
            leaves = sorted({p.rsplit(".", 1)[-1] for p in candidates})
            raise ValueError(f"target_modules: no linear layer found for {', '.join(missing)} in "
                             f"{type(model).__name__}; its patchable layers are named {leaves}")
    if bad:
        path, why = next(iter(bad.items()))
        raise ValueError(f"model: cannot patch {path!r}: {why}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""))
    if not chosen:
        raise ValueError(f"model: no nn.Linear or Conv1D layers found in {type(model).__name__} outside its output "
                         "heads; this architecture is not supported")

    for p in model.parameters():
        p.requires_grad_(False)
    conv1d = set()
    order = [p for p, _ in model.named_modules() if p in chosen]
    # Hold each original layer only until it is replaced, so a Conv1D's [in, out] weight is freed then (_to_hydra).
    candidates.clear()
    for path in order:
        module = chosen.pop(path)
        layer = _to_hydra(module, adapters, r, alpha, adapter_dtype)
        if type(module) is not nn.Linear:
            conv1d.add(path)
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, layer)
    # A plain attribute (not a buffer or parameter): it travels with deepcopy and never enters a state dict.
    model.hydra_patch = PatchInfo(adapters=adapters, r=r, alpha=float(alpha), modules=tuple(order),
                                  conv1d=frozenset(conv1d), merged=merged_adapters(model))
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put plain layers back (nn.Linear sharing the weight; Conv1D with the weight transposed back), dropping every
    adapter, and return the model. Base parameters stay frozen.

    To keep an adapter, fold it in first (merge_adapter_into_base); e.g. Hydra-SFT with a LoRA "sft" adapter:
    merge it, unpatch, then patch again with ("actor", "critic") for PPO.
    """
    info = patch_info(model)
    conv1d_type = _conv1d_type()
    for path, layer in hydra_modules(model).items():
        if path in info.conv1d:
            plain = conv1d_type(layer.out_features, layer.in_features)
            plain.weight = nn.Parameter(layer.weight.detach().t().contiguous(), requires_grad=False)
            plain.bias = layer.bias
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            plain.weight = layer.weight
            plain.bias = layer.bias
        parent_path, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, leaf, plain)
    del model.hydra_patch
    return model


def repeat_for_streams(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, n: int = 1):
    """(input_ids, attention_mask) repeated n times along the batch: the layout `streams(model, *names)` expects,
    stream s = rows [s·B, (s+1)·B). attention_mask may be None (returned as None)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: number of streams must be a positive int, got {n!r}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected [batch, seq], got shape {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    ids = input_ids.repeat(n, 1)
    return ids, (attention_mask.repeat(n, 1) if attention_mask is not None else None)


def check_token_ids(model: nn.Module, input_ids: torch.Tensor, name: str = "input_ids") -> None:
    """ValueError naming `name` unless input_ids is an int64 / int32 tensor of ids in [0, rows of the model's
    input embedding). The range check reads values (one small reduction and a host sync); it is skipped where
    values cannot be read or a sync is not allowed (torch.compile, make_fx, FakeTensorMode, CUDA graph capture).
    An out-of-range id would otherwise fail inside the embedding, on CUDA as a device-side assert."""
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name}: dtype {input_ids.dtype}; token ids must be int64 or int32")
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    weight = getattr(emb, "weight", None)
    if not isinstance(weight, torch.Tensor) or input_ids.numel() == 0:
        return
    probe = input_ids.reshape(-1)            # made here: a FakeTensor under FakeTensorMode (see plain_eager)
    if not plain_eager(probe) or (probe.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    V = full_shape(weight)[0]
    bad = (probe < 0) | (probe >= V)
    if bool(bad.any()):
        first = int(probe[bad][0])
        raise ValueError(f"{name}: token id {first} is outside the model's vocabulary [0, {V}) "
                         "(a tokenizer larger than the model's embedding?)")


def position_ids_from_attention_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as `generate` builds them: count of real tokens so far minus one, 0 on padding.

    With left padding the first real token gets position 0, so a scoring forward sees the same positions
    the rollout's generate used.
    """
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@functools.lru_cache(maxsize=None)
def _forward_params(cls: type) -> frozenset[str]:
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):
        return frozenset()


def cache_kwarg(module: nn.Module) -> str:
    """The name under which `module.forward` takes its KV cache: "cache" from transformers 5.24 on (where the old
    name "past_key_values" is deprecated and warns), "past_key_values" before."""
    return "cache" if "cache" in _forward_params(type(module)) else "past_key_values"


def output_cache(out):
    """The KV cache of a transformers model output, under either name (reading the old one warns on >= 5.24)."""
    cache = out.get("cache") if hasattr(out, "get") else None
    return cache if cache is not None else getattr(out, "past_key_values", None)


def decoder_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, streams: Sequence[str] | None = None,
                    past_key_values=None, use_cache: bool = False):
    """The decoder's final hidden states [S, B, T, D] and the KV cache (None unless use_cache), in one forward
    of `model.base_model` (the decoder without the LM head).

    streams: names for a patched model: the batch is repeated once per stream and stream s runs adapter
    streams[s] ("base" = LoRA off); None runs the model as it is (S = 1; an unpatched model, or a patched one on
    its current layout). position_ids default to cumsum(mask) - 1 (left padding), the positions generate uses.
    With past_key_values, attention_mask spans the cached tokens and the new ones (as in transformers).
    Raises ValueError naming input_ids for a float tensor or a token id outside the embedding (check_token_ids).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids: expected a [batch, seq] tensor, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    check_token_ids(model, input_ids)
    names = None if streams is None else validate_streams(model, streams)
    B, T = input_ids.shape
    S = 1 if names is None else len(names)
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B
                                       or attention_mask.shape[1] < T):
        raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not cover input_ids {(B, T)} "
                         "(with a KV cache it spans the cached tokens too)")
    if position_ids is None and attention_mask is not None:
        position_ids = position_ids_from_attention_mask(attention_mask)[:, -T:]
    ids = input_ids.repeat(S, 1)
    mask = attention_mask.repeat(S, 1) if attention_mask is not None else None
    backbone = model.base_model
    kwargs = {"input_ids": ids, "attention_mask": mask, "use_cache": use_cache}
    if past_key_values is not None:
        kwargs[cache_kwarg(backbone)] = past_key_values
    if position_ids is not None:
        if position_ids.shape != input_ids.shape:
            raise ValueError(f"position_ids: shape {tuple(position_ids.shape)} does not match input_ids {(B, T)}")
        if "position_ids" not in _forward_params(type(backbone)):
            raise ValueError(f"position_ids: {type(backbone).__name__} does not take position ids")
        kwargs["position_ids"] = position_ids.repeat(S, 1)

    def run():
        with (streams_context(model, *names) if names is not None else contextlib.nullcontext()):
            out = backbone(**kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden, (output_cache(out) if use_cache else None)
    # Under FSDP2 the backbone's embeddings and final norm belong to the root's group, which a call past the
    # root does not gather: run it as part of the root's forward.
    hidden, cache = gathered_call(model, run)
    return hidden.view(S, B, T, hidden.shape[-1]), cache


# torch.nn's dropout modules (the public subclasses of its private _DropoutNd base).
DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability in `model` to 0, in place: nn.Dropout modules and the float attributes
    attention layers read directly (e.g. Llama's `attention_dropout`, OPT's `dropout`).

    PPO needs this: old and new log-probs disagree otherwise, and activation checkpointing only runs in train
    mode. The config is left alone, so a merged checkpoint keeps the original dropout settings.
    """
    for module in model.modules():
        if isinstance(module, DROPOUT_MODULES):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name.lower() and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


def validate_streams(model: nn.Module, names: Sequence[str] | str) -> tuple[str, ...]:
    """names as a tuple of stream names of the patched `model` ("base" or one of its adapters; a str is one name).
    Raises ValueError (naming streams) for an empty or unknown name, and as patch_info for an unpatched model."""
    info = patch_info(model)
    names = (names,) if isinstance(names, str) else tuple(names)    # "actor" means one stream, not five
    if not names:
        raise ValueError("streams: needs at least one stream name")
    unknown = [n for n in names if n != BASE and n not in info.adapters]
    if unknown:
        raise ValueError(f"streams: unknown stream(s) {unknown}; this model has {(BASE,) + info.adapters}")
    return names
