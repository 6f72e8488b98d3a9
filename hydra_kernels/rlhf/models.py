"""PPO's models for each variant, built from the Hydra-SFT result (a causal LM + a reward head).

    variant   what is in memory                                   trainable
    hydra     1 base patched with adapters (actor, critic)        actor + critic LoRA, value head
    j-hydra   1 base patched with one adapter (actor)             the shared LoRA, value head
    lora      4 copies: reference, reward, actor+LoRA, critic+LoRA  actor + critic LoRA, value head
    full      4 copies: reference, reward, actor, critic          every weight of actor and critic, value head

The reward head is frozen; the value head starts as a copy of it (the paper's critic initialisation). Heads
are fp32 nn.Linear(hidden, 1) and read fp32 hidden states. Dropout is switched off and every model is in
eval() mode: PPO's old and new log-probs must come from the same function.

With model.activation_checkpointing, the models that train (the shared patched model; the lora/full actor
and critic) checkpoint every decoder layer: forwards under grad (the update pass) recompute the layers'
activations in backward instead of storing them, in eval() mode too (integrations.activation_checkpointing;
transformers' own mechanism would only act in train mode). Forwards under no_grad (rollout, scoring) and
forwards given a KV cache run exactly as without it; gradients are unchanged.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from hydra_kernels.integrations import (HydraModel, check_plain_logits, decoder_forward, disable_dropout,
                                        patch_model)
from hydra_kernels.integrations.activation_checkpointing import enable_activation_checkpointing
from hydra_kernels.ops.matmul import mm_f32

BASE, ACTOR, CRITIC = "base", "actor", "critic"
SHARED_VARIANTS = ("hydra", "j-hydra")


def hidden_size(model: nn.Module) -> int:
    return model.get_input_embeddings().weight.shape[1]


def new_reward_head(model: nn.Module, generator: torch.Generator | None = None) -> nn.Linear:
    """nn.Linear(hidden, 1) in fp32 on the model's device: weight ~ N(0, 1/(hidden+1)) (as TRL), bias 0."""
    d = hidden_size(model)
    head = nn.Linear(d, 1, device=model.get_input_embeddings().weight.device, dtype=torch.float32)
    with torch.no_grad():
        head.weight.normal_(0.0, 1.0 / (d + 1) ** 0.5, generator=generator)
        head.bias.zero_()
    return head


def lm_head_weight(model: nn.Module) -> torch.Tensor:
    """The LM head's weight [V, D]; a biased LM head is refused (the fused log-prob op takes none)."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"model: {type(model).__name__} has no output embedding (LM head)")
    if getattr(head, "bias", None) is not None:
        raise ValueError(f"model: the LM head of {type(model).__name__} has a bias; not supported")
    return head.weight


def decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None, names: tuple[str, ...] | None = None,
                   past_key_values=None, use_cache: bool = False):
    """The decoder's final hidden states [S, B, T, D] and the KV cache: integrations.decoder_forward (names: the
    streams of a patched model, None for an unpatched one)."""
    return decoder_forward(model, input_ids, attention_mask, position_ids, names, past_key_values, use_cache)


def _prepare(model: nn.Module) -> nn.Module:
    disable_dropout(model)
    return model.eval()


@dataclass
class PolicyHandle:
    """One policy to sample from: the model, the stream that runs it (None = unpatched), its LM head."""
    model: nn.Module
    stream: str | None

    def logits(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        """fp32 logits of the last position [B, V] and the KV cache (one decoding step)."""
        names = None if self.stream is None else (self.stream,)
        h, past = decoder_hidden(self.model, input_ids, attention_mask, position_ids, names,
                                 past_key_values, use_cache)
        return last_logits(self.model.get_output_embeddings(), h[0]), past


def last_logits(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, V] of the last position of hidden [B, T, D]: the head in fp32, so sampled as scored."""
    return mm_f32(hidden[:, -1], lm_head.weight.T)


@dataclass
class PPOModels:
    """The models of one PPO variant (see the module docstring). Shared variants use `hydra` (an
    integrations.HydraModel: its `model` is the patched causal LM, its heads are `reward_head` and
    `value_head`; save it with hydra.save_pretrained, export the policy with hydra.merge("actor", dir));
    separate ones use `reference`, `reward_model`, `actor`, `critic` (the others are None)."""
    variant: str
    reward_head: nn.Linear
    value_head: nn.Linear
    hydra: HydraModel | None = None
    reference: nn.Module | None = None
    reward_model: nn.Module | None = None
    actor: nn.Module | None = None
    critic: nn.Module | None = None
    extra: dict = field(default_factory=dict)

    @property
    def model(self) -> nn.Module | None:
        """The patched causal LM of a shared variant."""
        return self.hydra.model if self.hydra is not None else None

    @property
    def shared(self) -> bool:
        return self.variant in SHARED_VARIANTS

    @property
    def device(self) -> torch.device:
        return self.value_head.weight.device

    def policy(self, which: str = "actor") -> PolicyHandle:
        """"actor" (the policy being trained) or "reference" (the SFT model: LoRA off / the frozen copy)."""
        if which not in ("actor", "reference"):
            raise ValueError(f"policy: must be 'actor' or 'reference', got {which!r}")
        if self.shared:
            return PolicyHandle(self.model, ACTOR if which == "actor" else BASE)
        if which == "reference":
            return PolicyHandle(self.reference, None)
        return PolicyHandle(self.actor, ACTOR if self.variant == "lora" else None)

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Every parameter the optimizer updates, by a stable name (the checkpoint keys)."""
        out = {}
        groups = {"model": self.model} if self.shared else {"actor": self.actor, "critic": self.critic}
        for prefix, m in groups.items():
            for name, p in m.named_parameters():
                if p.requires_grad:
                    out[f"{prefix}.{name}"] = p
        for name, p in self.value_head.named_parameters():
            out[f"value_head.{name}"] = p
        return out

    def frozen_state(self) -> dict[str, torch.Tensor]:
        """Every frozen tensor (base weights, reference and reward copies, reward head), for tests and audits."""
        trainable = {id(p) for p in self.named_trainable().values()}
        out = {}
        mods = {"model": self.model, "reference": self.reference, "reward_model": self.reward_model,
                "actor": self.actor, "critic": self.critic, "reward_head": self.reward_head}
        for prefix, m in mods.items():
            if m is None:
                continue
            for name, p in m.named_parameters():
                if id(p) not in trainable:
                    out[f"{prefix}.{name}"] = p
        return out


def build_ppo_models(model: nn.Module, reward_head: nn.Linear, cfg) -> PPOModels:
    """PPO's models for cfg.variant from the SFT result.

    hydra / j-hydra patch `model` in place (its base weights are shared, so "LoRA off" is the SFT model);
    lora / full use `model` itself as the frozen reference and add 3 deep copies (reward, actor, critic):
    the paper's 4-model baselines. Every variant switches dropout off in `model` and freezes its base.
    """
    if not isinstance(reward_head, nn.Linear) or reward_head.out_features != 1:
        raise ValueError("reward_head: expected nn.Linear(hidden, 1)")
    if reward_head.in_features != hidden_size(model):
        raise ValueError(f"reward_head: in_features {reward_head.in_features} does not match the model's hidden "
                         f"size {hidden_size(model)}")
    variant = cfg.variant
    reward_head = copy.deepcopy(reward_head).float().requires_grad_(False)
    value_head = copy.deepcopy(reward_head).requires_grad_(True)
    lora = dict(r=cfg.lora.r, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules)
    lm_head_weight(model)                       # refuse a biased LM head before anything is patched,
    check_plain_logits(model)                   # and logits transformed after it (sampled and scored from h·Wᵀ)
    if variant in SHARED_VARIANTS:
        adapters = (ACTOR, CRITIC) if variant == "hydra" else (ACTOR,)
        info = getattr(model, "hydra_patch", None)
        if info is None:
            patch_model(model, adapters=adapters, **lora)
        elif tuple(info.adapters) != adapters:
            raise ValueError(f"model: already patched with adapters {tuple(info.adapters)}; variant {variant!r} "
                             f"needs {adapters} (pass the unpatched SFT model)")
        hydra = HydraModel(_prepare(model))
        with torch.no_grad():
            hydra.reward_head.weight.copy_(reward_head.weight)
            hydra.reward_head.bias.copy_(reward_head.bias)
        hydra.init_value_head_from_reward()
        hydra.reward_head.requires_grad_(False)
        if cfg.model.activation_checkpointing:
            enable_activation_checkpointing(model)
        return PPOModels(variant, hydra.reward_head, hydra.value_head, hydra=hydra)
    if variant not in ("lora", "full"):
        raise ValueError(f"variant: unknown PPO variant {variant!r}")
    # The caller's model serves as the frozen reference (it is never updated), so exactly 4 copies exist.
    reference = _prepare(model).requires_grad_(False)
    reward_model = _prepare(copy.deepcopy(model)).requires_grad_(False)
    actor = _prepare(copy.deepcopy(model))
    critic = _prepare(copy.deepcopy(model))
    if variant == "lora":
        patch_model(actor, adapters=(ACTOR,), **lora)
        patch_model(critic, adapters=(CRITIC,), **lora)
    else:
        actor.requires_grad_(True)
        critic.requires_grad_(True)
        # The critic's LM head takes no part in the value (and the actor needs no value head).
        critic.get_output_embeddings().requires_grad_(False)
        if critic.get_output_embeddings().weight is critic.get_input_embeddings().weight:
            critic.get_input_embeddings().requires_grad_(True)   # tied: the embedding is still used
    if cfg.model.activation_checkpointing:
        enable_activation_checkpointing(actor)        # the frozen reference and reward model never run with grad
        enable_activation_checkpointing(critic)
    return PPOModels(variant, reward_head, value_head, reference=reference, reward_model=reward_model,
                     actor=actor, critic=critic)


def _local_dir(path: str, name: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{name}: no such directory: {path!r} (local directories only; nothing is downloaded)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def load_tokenizer(path: str, name: str = "model.tokenizer_path"):
    """AutoTokenizer from a local directory; errors are ValueErrors naming the setting `name`."""
    from transformers import AutoTokenizer
    _local_dir(path, name)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: cannot load a tokenizer from {path!r}: {_one_line(e)}") from None


def load_model_and_tokenizer(model_cfg, device: str | torch.device = "cpu"):
    """A local transformers causal LM and its tokenizer (never downloads: local_files_only)."""
    from transformers import AutoModelForCausalLM
    if not model_cfg.path:
        raise ValueError("model.path: a local model directory is required")
    dtype = getattr(torch, model_cfg.dtype)
    # The tokenizer first: it is quick, and a wrong model.tokenizer_path is reported before a model is loaded.
    tokenizer = load_tokenizer(model_cfg.tokenizer_path or model_cfg.path,
                               "model.tokenizer_path" if model_cfg.tokenizer_path else "model.path")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"model.path: cannot load a model from {model_cfg.path!r}: {_one_line(e)}") from None
    return model.to(device), tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: {name!r} requested but CUDA is not available")
    return dev


__all__ = ["PPOModels", "PolicyHandle", "build_ppo_models", "decoder_hidden", "lm_head_weight", "new_reward_head",
           "hidden_size", "load_model_and_tokenizer", "load_tokenizer", "resolve_device", "BASE", "ACTOR", "CRITIC"]
