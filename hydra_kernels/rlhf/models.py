"""What the PPO step asks of a variant's models (PPOModels; rlhf.variants defines the four), the policy handle
generation samples from, and loading a local model and tokenizer.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hydra_kernels.integrations import decoder_forward, load_causal_lm
from hydra_kernels.integrations.fsdp import gathered_call
from hydra_kernels.integrations.hydra_model import HydraModel
from hydra_kernels.ops.matmul import linear_f32

BASE, ACTOR, CRITIC = "base", "actor", "critic"
# The variants whose models are one patched base (rlhf.variants.SharedPPO).
SHARED_VARIANTS = ("hydra", "j-hydra")

Role = list[tuple[torch.Tensor, "int | None"]]       # (parameter, index of its slice in a stack, or None)


@dataclass
class PolicyHandle:
    """One policy to sample from: the model, the stream that runs it (None = unpatched), its LM head."""
    model: nn.Module
    stream: str | None

    def logits(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        """fp32 logits of the last position [B, V] and the KV cache (one decoding step)."""
        logits, _, past = self.last(input_ids, attention_mask, position_ids, past_key_values, use_cache)
        return logits, past

    def last(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        """One decoding step: fp32 logits of the last position [B, V], its hidden state [B, D], the KV cache."""
        names = None if self.stream is None else (self.stream,)

        def step():
            h, past = decoder_forward(self.model, input_ids, attention_mask, position_ids, names, past_key_values,
                                      use_cache)
            # The LM head's weight is read outside its module: ZeRO-3 gathers it for this call only (after the
            # decoder's hooks are done with a tied embedding); under FSDP2 the outer call has gathered it.
            logits = gathered_call(self.model, lambda: last_logits(self.model.get_output_embeddings(), h[0]),
                                   lm_head=True)
            return logits, h[0][:, -1], past
        # One gathered call under FSDP2 (integrations.fsdp): the decoder and the LM head's weight.
        return gathered_call(self.model, step)


def last_logits(lm_head: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """fp32 logits [B, V] of the last position of hidden [B, T, D]: the head (and its bias, if any) in fp32, so
    sampled as scored."""
    return linear_f32(hidden[:, -1], lm_head.weight, getattr(lm_head, "bias", None))


class PPOModels:
    """The models of one PPO variant and what the PPO step asks of them; build them with
    rlhf.variants.build_ppo_models. Every variant holds `reward_head` (frozen) and `value_head` (trained; None
    for a variant without a critic), fp32 nn.Linear(D, 1). Shared variants also hold `hydra`, an
    integrations.HydraModel (its `model` is the patched causal LM: save it with hydra.save_pretrained, export the
    policy with hydra.merge("actor", dir)); the others hold `reference`, `reward_model`, `actor` and `critic`.

    A subclass implements `policies`, `trainable_modules`, `score` and `forward` (and `roles` where a parameter
    serves both roles); `variant` is the config's name for it.
    """
    variant: str = ""
    hydra: HydraModel | None = None
    # The actor's and the critic's losses reach disjoint parameters through separate forwards (hydra: two streams,
    # lora and full: two copies); j-hydra's one adapter and one stream serve both. PPO then runs one backward per
    # role (cfg.separate_backward): the same gradients, one role's activations alive at a time.
    separate_roles: bool = True

    def __init__(self, reward_head: nn.Linear, value_head: nn.Linear | None):
        self.reward_head, self.value_head = reward_head, value_head

    @property
    def shared(self) -> bool:
        """One base with adapters (the reference and reward model are its base stream)."""
        return self.hydra is not None

    @property
    def device(self) -> torch.device:
        return self.reward_head.weight.device

    def policies(self) -> dict[str, PolicyHandle]:
        """{"actor": the policy being trained, "reference": the SFT policy (LoRA off / the frozen copy)}."""
        raise NotImplementedError

    def policy(self, which: str = "actor") -> PolicyHandle:
        """policies()[which]; ValueError unless which is "actor" or "reference"."""
        handles = self.policies()
        if which not in handles:
            raise ValueError(f"policy: must be 'actor' or 'reference', got {which!r}")
        return handles[which]

    def trainable_modules(self) -> dict[str, nn.Module]:
        """{checkpoint-key prefix: module} of the modules that hold trained parameters."""
        raise NotImplementedError

    def shardable(self) -> list[nn.Module]:
        """The modules run.parallel=fsdp2 shards (rlhf.distributed.shard): each holds a copy of the base."""
        raise NotImplementedError

    def named_trainable(self) -> dict[str, nn.Parameter]:
        """Every parameter the optimizer updates (requires_grad), by a stable name "<prefix>.<name>": the keys of
        checkpoints and of save_policy."""
        return {f"{prefix}.{name}": p for prefix, m in self.trainable_modules().items()
                for name, p in m.named_parameters() if p.requires_grad}

    def roles(self) -> dict[str, Role]:
        """{"actor": ..., "critic": ...}: which trained parameters (or slices p[i] of a stacked one) serve which
        role, for per-role learning rates and clipping (rlhf.optim). Here by module: the critic's and the value
        head's parameters are the critic's, all others the actor's."""
        actor: Role = []
        critic: Role = []
        for name, p in self.named_trainable().items():
            (critic if name.startswith(("critic.", "value_head.")) else actor).append((p, None))
        return {"actor": actor, "critic": critic}

    def sampled_value_head(self) -> nn.Linear | None:
        """The value head when it reads the policy's own stream (j-hydra): generate can then record the values
        while sampling (Rollout.values). None for a separate critic stream or model."""
        return None

    def score(self, rollout, *, temperature: float, kl_estimator: str):
        """Score a rollout without grad: a scoring.Scores (old and reference log-probs, KL, entropy, values
        [B, R], 0 off the response mask; reward-head scores [B]). kl_estimator: an ops.linear_logprobs KL name.
        Where the rollout recorded the old log-probs and entropy (and values), they are taken from it and the
        actor is not run (a sampled estimator only)."""
        raise NotImplementedError

    def forward(self, rollout, *, temperature: float, need_entropy: bool, roles: tuple[str, ...] = (ACTOR, CRITIC)):
        """The update's forward, with grad, of `roles` (a non-empty subset of ("actor", "critic")): (new log-probs
        [B, R], entropy [B, R] (need_entropy), values [B, R]), fp32, 0 off the response mask; None for what was
        not asked for (values: also for a variant without a critic)."""
        raise NotImplementedError

    def export_policy(self, out_dir, tokenizer=None) -> Path:
        """Write the trained policy as a plain transformers directory (AutoModelForCausalLM loads it; the
        tokenizer too, when given): the actor adapter merged into its base (hydra, j-hydra, lora), or the
        actor copy itself (full). An existing out_dir is replaced only if it is an earlier model directory
        (ValueError naming out_dir otherwise, nothing written). Returns the directory."""
        raise NotImplementedError


def check_roles(roles) -> tuple[bool, bool]:
    """(actor asked for, critic asked for) of PPOModels.forward's `roles`; ValueError for anything else."""
    roles = tuple(roles)
    if not roles or any(r not in (ACTOR, CRITIC) for r in roles):
        raise ValueError(f"roles: expected a non-empty subset of ('actor', 'critic'), got {roles!r}")
    return ACTOR in roles, CRITIC in roles


# ------------------------------------------------------------------------------------------------ loading
def _local_dir(path: str, name: str) -> None:
    if not os.path.isdir(path):
        raise ValueError(f"{name}: no such directory: {path!r} (local directories only; nothing is downloaded)")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def load_tokenizer(path: str, name: str = "model.tokenizer_path", *, trust_remote_code: bool = False):
    """AutoTokenizer from a local directory; errors are ValueErrors naming the setting `name`.
    trust_remote_code: model.trust_remote_code (run tokenizer code shipped in the directory)."""
    from transformers import AutoTokenizer
    _local_dir(path, name)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}: cannot load a tokenizer from {path!r}: {_one_line(e)}") from None


def load_model_and_tokenizer(model_cfg, device: str | torch.device = "cpu"):
    """A local transformers causal LM (safetensors weights only) and its tokenizer (never downloads), with
    model_cfg.dtype and model_cfg.trust_remote_code (a ModelConfig)."""
    if not model_cfg.path:
        raise ValueError("model.path: a local model directory is required")
    # The tokenizer first: it is quick, and a wrong model.tokenizer_path is reported before a model is loaded.
    tokenizer = load_tokenizer(model_cfg.tokenizer_path or model_cfg.path,
                               "model.tokenizer_path" if model_cfg.tokenizer_path else "model.path",
                               trust_remote_code=model_cfg.trust_remote_code)
    model = load_causal_lm(model_cfg.path, name="model.path", dtype=getattr(torch, model_cfg.dtype),
                           trust_remote_code=model_cfg.trust_remote_code)
    return model.to(device), tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"run.device: {name!r} requested but CUDA is not available")
    return dev


__all__ = ["PPOModels", "PolicyHandle", "Role", "check_roles", "last_logits", "load_model_and_tokenizer", "load_tokenizer",
           "load_causal_lm",
           "resolve_device", "BASE", "ACTOR", "CRITIC", "SHARED_VARIANTS"]
