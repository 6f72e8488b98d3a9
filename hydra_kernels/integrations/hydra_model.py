"""HydraModel: one patched causal LM, its LM head, a reward head and a value head, run as several streams.

    hydra = HydraModel.from_pretrained_base("path/to/model", adapters=("actor", "critic"), r=16, alpha=32)
    h = hydra.forward_streams(input_ids, attention_mask, streams=("base", "actor", "critic"))   # [3, B, T, D]
    ref_logits, act_logits = hydra.lm_logits(h[0]), hydra.lm_logits(h[1])   # or ops.linear_logprobs(h[:2], ...)
    score = hydra.reward(h[0], attention_mask)          # reward model = LoRA off + reward head
    values = hydra.values(h[2])                         # critic = critic adapter + value head
    hydra.generate(prompt_ids, attention_mask=prompt_mask, stream="actor", max_new_tokens=64)

The heads are never applied implicitly: the caller picks which stream's hidden states go through which head
(peft's modules_to_save stay active with adapters disabled; here nothing is "active").
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from hydra_kernels.integrations.activation_checkpointing import (disable_activation_checkpointing,
                                                               enable_activation_checkpointing)
from hydra_kernels.integrations import checkpoint as ckpt
from hydra_kernels.integrations.fsdp import (full_shape, full_tensor, gathered_call, load_full_, refuse_zero3, whole,
                                             write_once)
from hydra_kernels.integrations.loading import base_directory, check_tokenizer_fits, load_causal_lm
from hydra_kernels.integrations.patch import (BASE, PatchInfo, decoder_forward, hydra_modules, patch_info,
                                              patch_model, validate_streams)
from hydra_kernels.integrations.patch import disable_dropout as _disable_dropout
from hydra_kernels.nn.streams import rounded_adapters
from hydra_kernels.nn.streams import streams as hydra_streams
from hydra_kernels.ops import check_lora_args
from hydra_kernels.ops.matmul import linear_f32

__all__ = ["HydraModel", "last_token_index", "check_plain_logits", "lm_head", "lm_head_weight", "lm_head_bias",
           "hidden_size", "init_reward_head_", "new_reward_head"]

_HEAD_NAMES = ("reward_head", "value_head")
# Key of save_pretrained's safetensors metadata that records the LoRA settings the tensors were trained with.
_META_LORA = "hydra_kernels.lora"


# Config attributes with which a model's forward rescales its logits after the LM head (value that means "off").
# The fused head (ops.linear_logprobs) scores h·Wᵀ, so on such a model PPO's log-probs would not be those of the
# distribution generate() samples from. Gemma 2/3: tanh soft-capping; Cohere: logit_scale; Granite: logits_scaling.
_LOGIT_TRANSFORMS = (("final_logit_softcapping", None), ("logit_scale", 1.0), ("logits_scaling", 1.0),
                     ("output_multiplier", 1.0))


def check_plain_logits(model: nn.Module) -> None:
    """ValueError if the model's forward transforms its logits after the LM head (see _LOGIT_TRANSFORMS)."""
    configs = [getattr(model, "config", None)]
    configs.append(getattr(configs[0], "text_config", None))         # multimodal wrappers keep it here
    for cfg in filter(None, configs):
        for key, off in _LOGIT_TRANSFORMS:
            value = getattr(cfg, key, off)
            if value is not None and value != off and not (key == "final_logit_softcapping" and value == 0):
                raise ValueError(
                    f"model: {type(model).__name__} has config.{key}={value!r}: its forward transforms the logits "
                    "after the LM head, while hydra_kernels samples and scores with the head's h·Wᵀ (the fused LM "
                    "head), so PPO would train a distribution other than the model's")


def last_token_index(attention_mask: torch.Tensor, name: str = "attention_mask") -> torch.Tensor:
    """Index of the last real token per row ([B, T] 0/1 mask → [B] long); works for left and right padding.

    Read from the mask, never from the token ids, so pad == eos cannot move the reward position. Raises
    ValueError (naming the argument `name`) for a mask that is not 2-d or has a row without a real token.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"{name}: expected [batch, seq], got shape {tuple(attention_mask.shape)}")
    pos = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = torch.where(attention_mask.bool(), pos, -1).amax(-1)
    if bool((last < 0).any()):
        rows = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"{name}: rows {rows} have no real token")
    return last


def lm_head(model: nn.Module) -> nn.Module:
    """The LM head of a causal LM (model.get_output_embeddings()). Raises ValueError if it has none."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: {type(model).__name__} has no LM head (get_output_embeddings() returned None); "
                         "pass a causal LM (AutoModelForCausalLM)")
    return head


def lm_head_weight(model: nn.Module, allow_bias: bool = False) -> torch.Tensor:
    """The LM head's weight [V, D] (tied to the input embedding where the model ties it), the weight
    ops.linear_logprobs takes. Raises ValueError if the model has no LM head, or (unless allow_bias) a biased
    one: a caller that passes allow_bias=True passes lm_head_bias(model) along (ops.linear_logprobs(bias=...))."""
    head = lm_head(model)
    if not allow_bias and getattr(head, "bias", None) is not None:
        raise ValueError(f"model: the LM head of {type(model).__name__} has a bias; pass it on "
                         "(ops.linear_logprobs(..., bias=lm_head_bias(model))) with allow_bias=True")
    return head.weight


def lm_head_bias(model: nn.Module) -> torch.Tensor | None:
    """The LM head's bias [V] (Phi has one), or None: what ops.linear_logprobs takes as `bias`."""
    return getattr(lm_head(model), "bias", None)


def hidden_size(model: nn.Module) -> int:
    """D: the LM head's input size, i.e. the size of the final hidden states the reward and value heads read."""
    return full_shape(lm_head(model).weight)[1]


def init_reward_head_(head: nn.Linear, generator: torch.Generator | None = None) -> nn.Linear:
    """Initialise a reward head nn.Linear(D, 1) in place, as TRL does: weight ~ N(0, 1/(D + 1)), bias 0.
    generator: the RNG of the weight draw (None: torch's global one). Returns `head`."""
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / math.sqrt(head.in_features + 1), generator=generator)
        head.bias.zero_()
    return head


def new_reward_head(model: nn.Module, generator: torch.Generator | None = None) -> nn.Linear:
    """A reward head for `model`: nn.Linear(hidden_size(model), 1) in fp32 on the LM head's device, initialised
    by init_reward_head_ (generator: the RNG of its weights; nn.Linear's own init still draws from the global one)."""
    weight = lm_head(model).weight
    head = nn.Linear(weight.shape[1], 1, device=weight.device, dtype=torch.float32)
    return init_reward_head_(head, generator)


class HydraModel(nn.Module):
    """A patched causal LM (`model`, see patch_model) plus `reward_head` and `value_head`, both nn.Linear(D, 1)
    in fp32 (D = the LM head's input size). The value head starts as a copy of the reward head.

    `tokenizer` (optional, not a module) is written alongside merged models; it must fit the model's embedding
    (check_tokenizer_fits: ValueError naming tokenizer otherwise).
    """

    def __init__(self, model: nn.Module, tokenizer=None):
        super().__init__()
        patch_info(model)
        check_plain_logits(model)
        if tokenizer is not None:
            check_tokenizer_fits(tokenizer, model)
        weight = lm_head(model).weight
        self.model = model
        self.tokenizer = tokenizer
        d, device = weight.shape[1], weight.device
        # Heads in fp32: they are tiny, train better in fp32, and their scores feed advantages in fp32.
        self.reward_head = nn.Linear(d, 1, device=device, dtype=torch.float32)
        self.value_head = nn.Linear(d, 1, device=device, dtype=torch.float32)
        init_reward_head_(self.reward_head)
        self.init_value_head_from_reward()

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def from_pretrained_base(cls, base, adapters: Sequence[str] | None = None, r: int | None = None,
                             alpha: float | None = None, target_modules="all-linear", dtype: torch.dtype | None = None,
                             tokenizer=None, disable_dropout: bool = True, allow_untested: bool = False,
                             **load_kwargs) -> "HydraModel":
        """Load (or take) a causal LM, patch it and wrap it.

        base: a local directory (load_causal_lm(base, **load_kwargs): safetensors weights only) or a model
            instance (patched in place; an already patched one is used as is, and adapters/r/alpha, if given,
            must match).
        adapters, r, alpha: default ("actor", "critic"), 16, 32 for an unpatched base (adapters a sequence of
            names, never one str; r a positive int; alpha a finite positive number).
        dtype: load dtype (an unpatched model instance is converted with .to(dtype); a patched one is refused).
        tokenizer: a tokenizer, a path to load one from, or None (loaded from `base` when it is a directory
            that holds one).
        disable_dropout: set all dropout to 0 (PPO needs old and new log-probs to agree).
        Raises ValueError naming the argument (base: not a directory, pickle-only weights, unreadable files).
        """
        from transformers import AutoTokenizer
        # Checked before anything is loaded; None keeps meaning "as patched" for an already patched model.
        checked = check_lora_args(("actor", "critic") if adapters is None else adapters, 16 if r is None else r,
                                  32 if alpha is None else alpha, reserved=(BASE,))
        adapters, r, alpha = (None if v is None else c for v, c in zip((adapters, r, alpha), checked))
        if isinstance(base, (str, os.PathLike)):
            path = Path(base)
            model = load_causal_lm(path, name="base", dtype=dtype, **load_kwargs)
            if tokenizer is None and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
                tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        elif isinstance(base, nn.Module):
            if isinstance(base, HydraModel):
                raise ValueError("base: already a HydraModel")
            if dtype is not None and isinstance(getattr(base, "hydra_patch", None), PatchInfo):
                # .to(dtype) would also round the adapters, which stay fp32 master weights on a 16-bit model.
                raise ValueError("dtype: the model is already patched; convert it with .to(dtype) before patching")
            model = base if dtype is None else base.to(dtype)
        else:
            raise ValueError(f"base: expected a directory or a model, got {type(base).__name__}")
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)
        info = getattr(model, "hydra_patch", None)
        if isinstance(info, PatchInfo):
            for name, want, have in (("adapters", adapters and tuple(adapters), info.adapters), ("r", r, info.r),
                                     ("alpha", alpha, info.alpha)):
                if want is not None and want != have:
                    raise ValueError(f"{name}: the model is already patched with {name}={have!r}, asked for {want!r}")
        else:
            patch_model(model, adapters=("actor", "critic") if adapters is None else adapters,
                        r=16 if r is None else r, alpha=32 if alpha is None else alpha,
                        target_modules=target_modules, allow_untested=allow_untested)
        if disable_dropout:
            _disable_dropout(model)
        return cls(model, tokenizer=tokenizer)

    # -------------------------------------------------------------------------------------------- properties
    @property
    def patch(self) -> PatchInfo:
        return patch_info(self.model)

    @property
    def adapters(self) -> tuple[str, ...]:
        return self.patch.adapters

    @property
    def config(self):
        return self.model.config

    @property
    def backbone(self) -> nn.Module:
        """The decoder without the LM head (model.base_model); its output is what the LM head reads."""
        return self.model.base_model

    @property
    def lm_head(self) -> nn.Module:
        return lm_head(self.model)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, D]: lm_head_weight(self.model), a biased head allowed (lm_logits applies the bias)."""
        return lm_head_weight(self.model, allow_bias=True)

    @property
    def lm_head_bias(self) -> torch.Tensor | None:
        return getattr(self.lm_head, "bias", None)

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.model)

    def hydra_layers(self) -> dict:
        """{module path: HydraLinear} of the patched backbone."""
        return hydra_modules(self.model)

    def lora_parameters(self) -> list[nn.Parameter]:
        """The LoRA A/B stacks of every layer (all adapters: each stack holds them side by side)."""
        return [p for layer in hydra_modules(self.model).values() for p in (layer.lora_A, layer.lora_B)]

    # ----------------------------------------------------------------------------------------------- forward
    def forward_streams(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                        streams: Sequence[str] = (BASE, "actor", "critic"),
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """One forward of the batch repeated once per stream → final hidden states [S, B, T, D].

        input_ids, attention_mask: [B, T] (left or right padding). position_ids default to what generate
        uses (counted from the attention mask), so scoring a rollout sees the positions it was generated with.
        Stream s runs adapter streams[s] ("base" = LoRA off). No head is applied.
        """
        return decoder_forward(self.model, input_ids, attention_mask, position_ids, streams)[0]

    forward = forward_streams

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] in fp32 (the head's matmul runs in fp32: bf16 logits drift by whole nats).

        Materialises the logits; for log-probs over a large vocab use ops.linear_logprobs(hidden,
        self.lm_head_weight, ...) instead.
        """
        return gathered_call(self, lambda: linear_f32(hidden, whole(self.lm_head_weight), whole(self.lm_head_bias)),
                             lm_head=True)

    def logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0, kl: str | None = None,
                 ignore_index: int = -100):
        """ops.linear_logprobs through this model's LM head: hidden [S, B, T, D] (or a list of S [B, T, D]),
        targets [B, T] → (logp [S, B, T], entropy [S, B, T], kl [B, T] between streams 0 and 1, or None), fp32,
        logits never stored; a biased LM head's bias is applied. Align them yourself: hidden[..., :-1, :]
        predicts targets = input_ids[:, 1:].
        """
        from hydra_kernels.ops import linear_logprobs
        # The LM head is read inside the call: under FSDP2 it is gathered there (and again in backward).
        return gathered_call(self, lambda: linear_logprobs(hidden, whole(self.lm_head_weight), targets,
                                                           temperature=temperature, kl=kl,
                                                           ignore_index=ignore_index, bias=whole(self.lm_head_bias)),
                             lm_head=True)

    def reward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Reward head at each sequence's last real token: hidden [..., B, T, D], attention_mask [B, T] → [..., B]
        (fp32). Pass the base stream's hidden states for the Hydra reward model."""
        if hidden.dim() < 3 or tuple(attention_mask.shape) != tuple(hidden.shape[-3:-1]):
            raise ValueError(f"attention_mask: shape {tuple(attention_mask.shape)} does not match hidden "
                             f"{tuple(hidden.shape)} (expected [..., B, T, D] and [B, T])")
        last = last_token_index(attention_mask)
        index = last.view(-1, 1, 1).expand(*hidden.shape[:-3], -1, 1, hidden.shape[-1])
        h = torch.gather(hidden, -2, index).squeeze(-2)                  # [..., B, D]
        return gathered_call(self, self.reward_head, h.float()).squeeze(-1)

    def values(self, hidden: torch.Tensor) -> torch.Tensor:
        """Value head per token: hidden [..., T, D] → [..., T] (fp32). Pass the critic stream's hidden states."""
        return gathered_call(self, self.value_head, hidden.float()).squeeze(-1)

    def init_value_head_from_reward(self) -> None:
        """Copy the reward head into the value head (done at construction; call again after training the reward
        head in Hydra-SFT)."""
        with torch.no_grad():
            self.value_head.weight.copy_(self.reward_head.weight)
            self.value_head.bias.copy_(self.reward_head.bias)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, stream: str = "actor",
                 **generate_kwargs):
        """model.generate (KV cache and all) with every layer on one stream ("base" = the reference policy).

        fp32 adapters of a 16-bit model are rounded once for the whole call (nn.rounded_adapters), not per token.
        """
        validate_streams(self.model, (stream,))
        with hydra_streams(self.model, stream), rounded_adapters(self.model):
            return gathered_call(self, lambda: self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                                                   **generate_kwargs))

    def enable_activation_checkpointing(self, use_reentrant: bool = False) -> None:
        """Recompute every decoder layer's activations in backward (integrations.activation_checkpointing:
        unlike transformers' own mechanism it also acts in eval mode, where PPO runs).

        Gradients equal those without checkpointing: each checkpointed layer is bound to the stream layout of
        its forward (nn.bind_streams) and recomputes with it, also when several forwards with different layouts
        precede one backward. For torch.utils.checkpoint or transformers' own checkpointing of your own, pass
        nn.checkpoint_context_fn as context_fn (use_reentrant=False) or wrap the function in nn.bind_streams.
        """
        enable_activation_checkpointing(self.model, use_reentrant=use_reentrant)

    def disable_activation_checkpointing(self) -> None:
        disable_activation_checkpointing(self.model)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _config_dict(self) -> dict:
        info = self.patch
        cfg = self.model.config
        return {
            "format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION,
            "adapters": list(info.adapters), "r": info.r, "alpha": info.alpha,
            "modules": list(info.modules), "conv1d": sorted(info.conv1d), "merged_into_base": list(info.merged),
            "model_type": getattr(cfg, "model_type", None),
            "base_model_name_or_path": base_directory(self.model)[0],
            "hidden_size": self.hidden_size, "vocab_size": full_shape(self.lm_head_weight)[0],
            "heads": {"reward_head": "Linear(hidden, 1) at the last real token",
                      "value_head": "Linear(hidden, 1) per token"},
        }

    def save_pretrained(self, save_dir) -> None:
        """Write adapters + heads (hydra_model.safetensors) and hydra_config.json to save_dir, each atomically.

        The base weights are not written: load with from_pretrained(save_dir, base=...). If an adapter was merged
        into the base in place (merge_adapter_into_base), write that base with merge(None, dir) and load on it.
        The safetensors header repeats adapters, r and alpha, so a hydra_config.json edited afterwards is refused
        on load rather than applied to the tensors. Sharded with integrations.fsdp.shard or partitioned by a ZeRO-3
        engine, every rank calls it and rank 0 writes (a failure there raises on every rank).
        """
        save_dir = Path(save_dir)
        info = self.patch
        tensors = ckpt.adapter_tensors(self.model)
        for head in _HEAD_NAMES:
            for name, p in getattr(self, head).named_parameters():
                tensors[f"{head}.{name}"] = full_tensor(p).detach()
        meta = {"format": "pt", _META_LORA: json.dumps({"adapters": list(info.adapters), "r": info.r,
                                                         "alpha": info.alpha})}
        config = self._config_dict()

        def write():
            ckpt.atomic_save_safetensors(save_dir / ckpt.WEIGHTS_NAME, tensors, metadata=meta)
            ckpt.atomic_write_json(save_dir / ckpt.CONFIG_NAME, config)
        # Under FSDP2 every rank calls this: the tensors are gathered above, rank 0 writes, all learn the outcome.
        write_once(self, write, what="save_pretrained")

    @staticmethod
    def read_config(load_dir) -> dict:
        """hydra_config.json of a save_pretrained directory, checked: format and version, and the fields
        adapters (distinct names), r (positive int), alpha (finite positive number), modules (distinct module
        paths), conv1d (a subset of modules), merged_into_base (names), hidden_size and vocab_size (positive
        ints, where present). Returns the dict with alpha as a float and the optional lists filled in.
        Raises ValueError naming the file and the field (missing file, bad JSON, missing or mistyped field)."""
        path = Path(load_dir) / ckpt.CONFIG_NAME
        if not path.is_file():
            raise ValueError(f"load_dir: {str(load_dir)!r} has no {ckpt.CONFIG_NAME}")
        where = f"load_dir: {str(path)!r}"
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError) as e:          # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ValueError(f"{where} is not readable JSON ({' '.join(str(e).split())})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{where} holds a JSON {type(cfg).__name__}, expected an object")
        if cfg.get("format") != ckpt.FORMAT or cfg.get("format_version") != ckpt.FORMAT_VERSION:
            raise ValueError(f"{where} is not a {ckpt.FORMAT} v{ckpt.FORMAT_VERSION} config "
                             f"(format={cfg.get('format')!r}, version={cfg.get('format_version')!r})")
        for key in ("adapters", "r", "alpha", "modules"):
            if key not in cfg:
                raise ValueError(f"{where}: missing field {key!r}")
        try:
            if not isinstance(cfg["adapters"], list):
                raise ValueError(f"adapters: expected a list of names, got {cfg['adapters']!r}")
            adapters, r, alpha = check_lora_args(cfg["adapters"], cfg["r"], cfg["alpha"], reserved=(BASE,))
        except ValueError as e:
            raise ValueError(f"{where}: field {e}") from None
        out = dict(cfg, adapters=list(adapters), r=r, alpha=alpha)
        for key, required in (("modules", True), ("conv1d", False), ("merged_into_base", False)):
            value = cfg.get(key) if required or cfg.get(key) is not None else []
            if (not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)
                    or len(set(value)) != len(value)):
                raise ValueError(f"{where}: field {key!r} must be a list of distinct non-empty names, got {value!r}")
            out[key] = value
        if not out["modules"]:
            raise ValueError(f"{where}: field 'modules' is empty (a checkpoint patches at least one module)")
        if not set(out["conv1d"]) <= set(out["modules"]):
            raise ValueError(f"{where}: field 'conv1d' names modules that are not in 'modules'")
        for key in ("hidden_size", "vocab_size"):
            v = cfg.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{where}: field {key!r} must be a positive int, got {v!r}")
        return out

    @classmethod
    def from_pretrained(cls, load_dir, base, dtype: torch.dtype | None = None, tokenizer=None,
                        disable_dropout: bool = True, allow_untested: bool = False, check_base: bool = True,
                        **load_kwargs) -> "HydraModel":
        """Rebuild a HydraModel saved by save_pretrained on `base` (a directory or model, as in
        from_pretrained_base), patching exactly the saved modules, then load adapters and heads (load_adapters:
        everything read is checked, ValueError naming the file and field or tensor otherwise)."""
        cfg = cls.read_config(load_dir)
        hydra = cls.from_pretrained_base(base, adapters=cfg["adapters"], r=cfg["r"], alpha=cfg["alpha"],
                                         target_modules=cfg["modules"], dtype=dtype, tokenizer=tokenizer,
                                         disable_dropout=disable_dropout, allow_untested=allow_untested,
                                         **load_kwargs)
        hydra.load_adapters(load_dir, check_base=check_base)
        return hydra

    def load_adapters(self, load_dir, check_base: bool = True) -> None:
        """Load adapters and heads saved by save_pretrained into this model. Everything is checked first, and on
        a mismatch nothing changes: the config (read_config) against the model (adapter set, rank, alpha,
        patched modules, hidden and vocabulary size) and against the tensors (their rank; adapters, r and alpha
        as the safetensors header records them), the tensors' names, shapes and dtypes, and their values
        (NaN or inf refused). Raises ValueError naming the file and the field or tensor.

        check_base: the adapters must have been trained on a base with the same adapters merged into it
        (merge_adapter_into_base, e.g. Hydra-SFT); otherwise "LoRA off" would be the wrong model.
        """
        refuse_zero3(self.parameters(), "load_adapters")
        load_dir = Path(load_dir)
        cfg = self.read_config(load_dir)
        info = self.patch
        where = str(load_dir / ckpt.WEIGHTS_NAME)
        cfg_where = str(load_dir / ckpt.CONFIG_NAME)
        saved_merged = tuple(cfg["merged_into_base"])
        if check_base and saved_merged != info.merged:
            raise ValueError(f"load_dir: {str(load_dir)!r} was trained on a base with {list(saved_merged)} merged "
                             f"into it; this base has {list(info.merged)} (load the base written by "
                             "merge(None, dir) after merge_adapter_into_base, or pass check_base=False)")
        if set(cfg["adapters"]) != set(info.adapters):
            raise ValueError(f"adapters: checkpoint {str(load_dir)!r} has adapters {tuple(cfg['adapters'])}, "
                             f"the model has {info.adapters}")
        if cfg["r"] != info.r or cfg["alpha"] != info.alpha:
            raise ValueError(f"r: checkpoint has r={cfg['r']}, alpha={cfg['alpha']}; the model has r={info.r}, "
                             f"alpha={info.alpha}")
        for key, have in (("hidden_size", self.hidden_size), ("vocab_size", self.lm_head_weight.shape[0])):
            if cfg.get(key) is not None and cfg[key] != have:
                raise ValueError(f"load_dir: {cfg_where!r}: field {key!r} is {cfg[key]}, the model's is {have}")
        saved, have = list(cfg["modules"]), set(info.modules)
        for path in saved:
            if path not in have:
                raise ValueError(f"{where}: tensor 'adapters.*.{path}.lora_A': module {path!r} is not patched in "
                                 "this model")
        for path in info.modules:
            if path not in set(saved):
                raise ValueError(f"{where}: missing tensors for patched module {path!r}")
        tensors, meta = ckpt.load_safetensors(load_dir / ckpt.WEIGHTS_NAME, name="load_dir")
        self._check_header(meta, cfg, cfg_where, where)
        first = ckpt.adapter_key(info.adapters[0], info.modules[0], "lora_A")
        if first in tensors and tensors[first].dim() == 2 and tensors[first].shape[0] != cfg["r"]:
            raise ValueError(f"load_dir: {cfg_where!r}: field 'r' is {cfg['r']}, but the adapters in {where!r} "
                             f"have rank {tensors[first].shape[0]}")
        heads = []
        for head in _HEAD_NAMES:
            for name, p in getattr(self, head).named_parameters():
                key = f"{head}.{name}"
                if key not in tensors:
                    raise ValueError(f"{where}: missing tensor {key!r}")
                if tuple(tensors[key].shape) != tuple(p.shape):
                    raise ValueError(f"{where}: tensor {key!r} has shape {tuple(tensors[key].shape)}, the model "
                                     f"expects {tuple(p.shape)} (hidden size {self.hidden_size})")
                if not tensors[key].is_floating_point():
                    raise ValueError(f"{where}: tensor {key!r} has dtype {tensors[key].dtype}; heads are floating "
                                     "point")
                heads.append((p, tensors[key]))
        ckpt.load_adapter_tensors(self.model, tensors, info.adapters, source=where,
                                  extra_ok=lambda k: k.split(".", 1)[0] in _HEAD_NAMES and
                                  any(k == f"{h}.{n}" for h in _HEAD_NAMES for n in ("weight", "bias")))
        for p, t in heads:
            load_full_(p, t)                     # into this rank's shard where FSDP2 shards the head

    @staticmethod
    def _check_header(meta: dict, cfg: dict, cfg_where: str, where: str) -> None:
        """The adapters, r and alpha save_pretrained recorded in the safetensors header equal the config's."""
        if _META_LORA not in meta:                  # written before the header carried them: nothing to compare
            return
        try:
            header = json.loads(meta[_META_LORA])
            recorded = {"adapters": list(header["adapters"]), "r": int(header["r"]), "alpha": float(header["alpha"])}
        except (ValueError, TypeError, KeyError):
            raise ValueError(f"load_dir: {where!r}: unreadable {_META_LORA!r} metadata in its header") from None
        for key, value in recorded.items():
            if cfg[key] != value:
                raise ValueError(f"load_dir: {cfg_where!r}: field {key!r} is {cfg[key]!r}, but {where!r} was saved "
                                 f"with {key}={value!r} (was the config edited?)")

    # ------------------------------------------------------------------------------------ merging and PEFT
    def merge(self, adapter: str | None, out_dir) -> Path:
        """Write a plain transformers directory with `adapter` folded into the weights (None or "base": the base
        as it is now), plus the tokenizer if one is attached. Loads with AutoModelForCausalLM.from_pretrained.
        An existing out_dir is replaced only if it is an earlier merged model directory written by this library
        (checkpoint.check_replaceable); anything else, the user's own pretrained model included, raises
        ValueError naming out_dir and nothing is written. Returns out_dir as a Path."""
        return ckpt.save_merged(self.model, adapter, out_dir, tokenizer=self.tokenizer)

    def merge_adapter_into_base(self, adapter: str) -> None:
        """Fold `adapter` into the base weights in place and reset it (Hydra-SFT: "LoRA off" = the SFT model)."""
        ckpt.merge_adapter_into_base(self.model, adapter)

    def export_peft(self, adapter: str, out_dir) -> Path:
        """Write `adapter` as a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors) that names
        the directory holding this model's base as an absolute path; see peft_lora.export_peft."""
        from hydra_kernels.integrations.peft_lora import export_peft
        return export_peft(self.model, adapter, out_dir)

    def load_peft(self, adapter: str, peft_dir) -> None:
        """Load a PEFT LoRA directory into `adapter` (rank and alpha must match the model's)."""
        from hydra_kernels.integrations.peft_lora import import_peft
        import_peft(self.model, adapter, peft_dir)
