"""PPO's variants (Santacroce et al. 2023), one small models.PPOModels each, built from the Hydra-SFT result.

    variant   in memory                                    scoring pass (no grad)              trains
    hydra     1 base with adapters (actor, critic)         1 forward: base, actor, critic      both adapters
    j-hydra   1 base with one adapter (actor)              1 forward: base, actor              the adapter
    lora      4 copies: reference, reward, actor, critic   4 forwards (actor, critic: LoRA)    both adapters
    full      4 copies: reference, reward, actor, critic   4 forwards                          actor, critic

Each also trains a value head. The reward head is frozen; the value head starts as a copy of it (the paper's
critic initialisation). CriticFree (GRPO and the other critic-free estimators) is one base with one adapter and
no value head; its scoring forward runs only the streams a step needs. Dropout is off and every model is in
eval() mode: old and new log-probs must come from the same function. With model.activation_checkpointing the
trained models recompute decoder layers in backward, with model.lean_activations (default) their norms and gated
MLP activations.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hydra_kernels import ops
from hydra_kernels.integrations import check_plain_logits, decoder_forward, disable_dropout, patch_model
from hydra_kernels.integrations.activation_checkpointing import enable_activation_checkpointing
from hydra_kernels.integrations.lean_activations import enable_lean_activations
from hydra_kernels.integrations.checkpoint import MERGE_FOREIGN, save_merged, write_dir_atomically
from hydra_kernels.integrations.fsdp import any_sharded, full_state_dict, write_once
from hydra_kernels.integrations.hydra_model import HydraModel, hidden_size, last_token_index, new_reward_head
from hydra_kernels.rlhf.models import ACTOR, BASE, CRITIC, PolicyHandle, PPOModels, Role, check_roles
from hydra_kernels.rlhf.scoring import (IGNORE_INDEX, Scores, apply_head, logits_f32, response_hidden,
                                        response_targets)


def _prepare(model: nn.Module) -> nn.Module:
    disable_dropout(model)
    return model.eval()


def _trained_forwards(cfg, *models: nn.Module) -> None:
    """What the models that run with grad recompute in backward: model.activation_checkpointing (whole decoder
    layers) and model.lean_activations (norms and the gated MLP's activation)."""
    for m in models:
        if cfg.model.lean_activations:
            enable_lean_activations(m)
        if cfg.model.activation_checkpointing:
            enable_activation_checkpointing(m)


def _writable(tokenizer):
    """The tokenizer if it can write itself (save_pretrained), else None (as save_sft treats one)."""
    return tokenizer if hasattr(tokenizer, "save_pretrained") else None


def _lora(cfg) -> dict:
    return dict(r=cfg.lora.r, alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                allow_untested=cfg.model.allow_untested)


# ------------------------------------------------------------------------------------------ one base
class SharedPPO(PPOModels):
    """Variants on one base patched with adapters (`hydra`, an integrations.HydraModel): the reference policy is
    the base stream and the reward model the base stream + reward head, so one forward scores a rollout, and
    one linear_logprobs sweep of the LM head gives the policy's and the reference's log-probs and the KL.

    A subclass names its `adapters` (the policy's, "actor", among them) and `value_stream`, the stream whose
    hidden states the value head reads (None: no critic, values None).
    """
    adapters: tuple[str, ...] = (ACTOR,)
    value_stream: str | None = None

    def __init__(self, hydra: HydraModel):
        super().__init__(hydra.reward_head, None if self.value_stream is None else hydra.value_head)
        self.hydra = hydra

    @property
    def model(self) -> nn.Module:
        """The patched causal LM."""
        return self.hydra.model

    @classmethod
    def build(cls, model: nn.Module, reward_head: nn.Linear, cfg) -> "SharedPPO":
        """Patch `model` in place with cls.adapters (an already patched model must have exactly those)."""
        info = getattr(model, "hydra_patch", None)
        if info is None:
            patch_model(model, adapters=cls.adapters, **_lora(cfg))
        elif tuple(info.adapters) != cls.adapters:
            raise ValueError(f"model: already patched with adapters {tuple(info.adapters)}; variant {cls.variant!r} "
                             f"needs {cls.adapters} (pass the unpatched SFT model)")
        hydra = HydraModel(_prepare(model))
        with torch.no_grad():
            hydra.reward_head.weight.copy_(reward_head.weight)
            hydra.reward_head.bias.copy_(reward_head.bias)
        hydra.init_value_head_from_reward()
        hydra.reward_head.requires_grad_(False)
        _trained_forwards(cfg, model)
        return cls(hydra)

    def policies(self) -> dict[str, PolicyHandle]:
        return {"actor": PolicyHandle(self.model, ACTOR), "reference": PolicyHandle(self.model, BASE)}

    def export_policy(self, out_dir, tokenizer=None) -> Path:
        """The actor adapter folded into the shared base (HydraModel.merge); see PPOModels.export_policy."""
        return save_merged(self.model, ACTOR, out_dir, tokenizer=_writable(tokenizer or self.hydra.tokenizer))

    def shardable(self) -> list[nn.Module]:
        return [self.hydra]                      # the base, with the reward and value heads in its root group

    def trainable_modules(self) -> dict[str, nn.Module]:
        out = {"model": self.model}
        if self.value_head is not None:
            out["value_head"] = self.value_head
        return out

    def _values(self, hr: torch.Tensor, streams: tuple[str, ...]) -> torch.Tensor | None:
        return None if self.value_stream is None else self.hydra.values(hr[streams.index(self.value_stream)])

    @torch.no_grad()
    def score(self, rollout, *, temperature: float, kl_estimator: str) -> Scores:
        # Old log-probs recorded by the rollout: the actor stream runs only where the values need it (hydra: the
        # critic's; j-hydra, values recorded too: base alone).
        sampled = rollout.logprobs is not None
        need_values = self.value_stream is not None and not (sampled and rollout.values is not None)
        streams = (BASE, *self.adapters) if not sampled else (BASE, *((self.value_stream,) if need_values else ()))
        mask = rollout.attention_mask
        h = self.hydra.forward_streams(rollout.input_ids, mask, streams, rollout.position_ids)   # [S, B, L, D]
        hr = response_hidden(h, rollout)
        targets = response_targets(rollout)
        if sampled:
            ref, _, _ = self.hydra.logprobs([hr[0]], targets, temperature=temperature, kl=None,
                                            ignore_index=IGNORE_INDEX)
            logp, ref_logp, ent = rollout.logprobs, ref[0], rollout.entropy
            kl = ops.sampled_kl(ref_logp - logp, kl_estimator)
        else:
            # Stream 0 of the op is the policy, stream 1 the reference: one sweep of W_lm serves both.
            lp, e, kl = self.hydra.logprobs([hr[streams.index(ACTOR)], hr[0]], targets, temperature=temperature,
                                            kl=kl_estimator, ignore_index=IGNORE_INDEX)
            logp, ref_logp, ent = lp[0], lp[1], e[0]
        values = self._values(hr, streams) if need_values else rollout.values
        scores = self.hydra.reward(h[0], mask)                 # reward model = LoRA off + reward head
        return Scores.masked(rollout, logp, ref_logp, kl, ent, values, scores)

    def forward(self, rollout, *, temperature: float, need_entropy: bool, roles: tuple[str, ...] = (ACTOR, CRITIC)):
        actor, critic = check_roles(roles)
        critic = critic and self.value_stream is not None
        # The streams of the roles asked for, each once (j-hydra: the actor stream serves both).
        streams = tuple(dict.fromkeys((ACTOR,) * actor + (self.value_stream,) * critic))
        h = self.hydra.forward_streams(rollout.input_ids, rollout.attention_mask, streams, rollout.position_ids)
        hr = response_hidden(h, rollout)
        m = rollout.response_mask.float()
        logp = ent = values = None
        if actor:
            lp, e, _ = self.hydra.logprobs([hr[streams.index(ACTOR)]], response_targets(rollout),
                                           temperature=temperature, kl=None, ignore_index=IGNORE_INDEX)
            logp, ent = lp[0] * m, (e[0] * m if need_entropy else None)
        if critic:
            values = self._values(hr, streams) * m
        return logp, ent, values


class HydraPPO(SharedPPO):
    """Hydra-PPO: actor and critic adapters on one base; the critic stream feeds the value head."""
    variant = "hydra"
    adapters = (ACTOR, CRITIC)
    value_stream = CRITIC

    def roles(self) -> dict[str, Role]:
        """The actor's and the critic's LoRA factors share one stacked Parameter per layer ([adapters, ...]):
        slice `actor` of every stack is the actor's, slice `critic` the critic's."""
        roles = super().roles()
        a, k = self.hydra.adapters.index(ACTOR), self.hydra.adapters.index(CRITIC)
        stacked = {id(p) for p in self.hydra.lora_parameters()}
        roles["critic"] += [(p, k) for p, _ in roles["actor"] if id(p) in stacked]
        roles["actor"] = [(p, a) if id(p) in stacked else (p, None) for p, _ in roles["actor"]]
        return roles


class JHydraPPO(SharedPPO):
    """J-Hydra-PPO: one adapter shared by actor and critic; the actor stream feeds the value head too."""
    variant = "j-hydra"
    adapters = (ACTOR,)
    value_stream = ACTOR
    separate_roles = False

    def sampled_value_head(self) -> nn.Linear:
        return self.value_head


@dataclass
class PolicyScores:
    """What a critic-free step scored, without grad (None where it was not asked for): per response token
    [B, R], 0 off the response mask, the actor's log-probs (the "old" ones) and entropy, the reference's (base
    stream) log-probs and the KL between them; scores [B]: the reward head on the base stream."""
    logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class CriticFree(SharedPPO):
    """The critic-free estimators' models (GRPO, Dr. GRPO, DAPO, RLOO, REINFORCE++): one base patched with one
    adapter, "actor", and no value head. The reference policy is the base stream of the same forward as the
    policy, and the reward model (when the Hydra-SFT reward head is the reward) the base stream + reward head.
    `score_policies` runs only the streams a step needs, in one forward and one linear_logprobs sweep."""
    variant = "critic-free"
    adapters = (ACTOR,)
    value_stream = None

    @classmethod
    def build(cls, model: nn.Module, reward_head: nn.Linear | None, cfg) -> "CriticFree":
        """Patch `model` in place with the actor adapter. reward_head: the Hydra-SFT head (copied, frozen), or None
        for a model without one (a fixed head is made; the step never reads it unless reward_source is head)."""
        if reward_head is None:
            reward_head = new_reward_head(model, torch.Generator().manual_seed(0))
        return super().build(model, reward_head.float().requires_grad_(False), cfg)

    @torch.no_grad()
    def score_policies(self, rollout, *, actor: bool, reference: bool, reward: bool, temperature: float,
                       kl_estimator: str | None = None) -> PolicyScores:
        """One no-grad forward of only the streams asked for (base for reference or reward, actor for actor) and,
        for log-probs, one linear_logprobs sweep of the LM head over them: actor -> logprobs and entropy,
        reference -> ref_logprobs, both with kl_estimator -> the KL(actor ‖ base) per token; reward -> the reward
        head on the base stream. Raises ValueError when nothing is asked for."""
        streams = tuple(s for s, want in ((BASE, reference or reward), (ACTOR, actor)) if want)
        if not streams:
            raise ValueError("actor: nothing to score (actor, reference and reward are all False)")
        mask = rollout.attention_mask
        h = self.hydra.forward_streams(rollout.input_ids, mask, streams, rollout.position_ids)     # [S, B, L, D]
        out = PolicyScores()
        if reward:
            out.scores = self.hydra.reward(h[streams.index(BASE)], mask)
        # Stream 0 of the op is the policy, stream 1 the reference: one sweep of W_lm serves both.
        order = [s for s, want in ((ACTOR, actor), (BASE, reference)) if want]
        if not order:
            return out
        hr = response_hidden(h, rollout)
        m = rollout.response_mask.float()
        logp, ent, klv = self.hydra.logprobs([hr[streams.index(s)] for s in order], response_targets(rollout),
                                             temperature=temperature, kl=kl_estimator if len(order) == 2 else None,
                                             ignore_index=IGNORE_INDEX)
        for i, s in enumerate(order):
            if s == ACTOR:
                out.logprobs, out.entropy = logp[i] * m, ent[i] * m
            else:
                out.ref_logprobs = logp[i] * m
        if klv is not None:
            out.kl = klv * m
        return out


def build_critic_free(model: nn.Module, reward_head: nn.Linear | None, cfg) -> CriticFree:
    """The critic-free estimators' models from a causal LM (a Hydra-SFT result or a plain one), patched in place
    with the actor adapter (cfg: a GRPOConfig, for lora.* and model.activation_checkpointing). reward_head: the
    Hydra-SFT reward head nn.Linear(D, 1) or None. Raises ValueError as build_ppo_models does."""
    if reward_head is not None:
        if not isinstance(reward_head, nn.Linear) or reward_head.out_features != 1:
            raise ValueError("reward_head: expected nn.Linear(hidden, 1) or None")
        if reward_head.in_features != hidden_size(model):
            raise ValueError(f"reward_head: in_features {reward_head.in_features} does not match the model's hidden "
                             f"size {hidden_size(model)}")
        reward_head = copy.deepcopy(reward_head)
    check_plain_logits(model)
    return CriticFree.build(model, reward_head, cfg)


# ------------------------------------------------------------------------------------- separate models
class SeparatePPO(PPOModels):
    """The paper's 4-model baselines: a frozen reference, a frozen reward model, an actor and a critic, each
    its own copy of the SFT model. Log-probs and KL come from materialised logits (ops.logprobs_and_kl), as
    the peer frameworks do; the logits are fp32 (as sampled), never the bf16 output of a bf16 head.

    A subclass sets `actor_stream` / `critic_stream` (the adapter each copy runs; None: unpatched) and
    `make_trainable(actor, critic, cfg)`.
    """
    actor_stream: str | None = None
    critic_stream: str | None = None

    def __init__(self, reward_head: nn.Linear, value_head: nn.Linear, reference: nn.Module,
                 reward_model: nn.Module, actor: nn.Module, critic: nn.Module):
        super().__init__(reward_head, value_head)
        self.reference, self.reward_model, self.actor, self.critic = reference, reward_model, actor, critic

    @staticmethod
    def make_trainable(actor: nn.Module, critic: nn.Module, cfg) -> None:
        raise NotImplementedError

    @classmethod
    def build(cls, model: nn.Module, reward_head: nn.Linear, cfg) -> "SeparatePPO":
        """`model` itself is the frozen reference (it is never updated), plus 3 deep copies: 4 in all."""
        value_head = copy.deepcopy(reward_head).requires_grad_(True)
        reference = _prepare(model).requires_grad_(False)
        reward_model = _prepare(copy.deepcopy(model)).requires_grad_(False)
        actor = _prepare(copy.deepcopy(model))
        critic = _prepare(copy.deepcopy(model))
        cls.make_trainable(actor, critic, cfg)
        _trained_forwards(cfg, actor, critic)           # the frozen reference and reward model never run with grad
        return cls(reward_head, value_head, reference, reward_model, actor, critic)

    def policies(self) -> dict[str, PolicyHandle]:
        return {"actor": PolicyHandle(self.actor, self.actor_stream), "reference": PolicyHandle(self.reference, None)}

    def export_policy(self, out_dir, tokenizer=None) -> Path:
        """The actor copy, its adapter (actor_stream) folded in where it has one; see PPOModels.export_policy."""
        tokenizer = _writable(tokenizer)
        if self.actor_stream is not None:
            return save_merged(self.actor, self.actor_stream, out_dir, tokenizer=tokenizer)

        # Under FSDP2 the weights are gathered on every rank (collective), and rank 0 writes them.
        state = full_state_dict(self.actor.state_dict()) if any_sharded(self.actor) else None

        def fill(tmp: Path) -> None:
            # safetensors, the config and generation config
            self.actor.save_pretrained(str(tmp), **({} if state is None else {"state_dict": state}))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return write_once(self.actor, lambda: write_dir_atomically(out_dir, fill, marker="config.json",
                                                                   foreign=MERGE_FOREIGN),
                          what="export_policy") or Path(out_dir)

    def shardable(self) -> list[nn.Module]:
        # The heads stay whole on every rank (small; their gradients are all-reduced).
        return [self.reference, self.reward_model, self.actor, self.critic]

    def trainable_modules(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "critic": self.critic, "value_head": self.value_head}

    @staticmethod
    def _hidden(model: nn.Module, rollout, stream: str | None) -> torch.Tensor:
        """Final hidden states [B, L, D] of one copy (stream: its adapter, None unpatched)."""
        h, _ = decoder_forward(model, rollout.input_ids, rollout.attention_mask, rollout.position_ids,
                               None if stream is None else (stream,))
        return h[0]

    @torch.no_grad()
    def score(self, rollout, *, temperature: float, kl_estimator: str) -> Scores:
        targets = response_targets(rollout)
        ref_logits = logits_f32(self.reference, response_hidden(self._hidden(self.reference, rollout, None), rollout))
        if rollout.logprobs is not None:                # recorded by the rollout: the actor copy does not run
            logp, ent = rollout.logprobs, rollout.entropy
            ref_logp = ops.token_logprobs(ref_logits, targets, temperature, IGNORE_INDEX)
            kl = ops.sampled_kl(ref_logp - logp, kl_estimator)
        else:
            act_logits = logits_f32(self.actor, response_hidden(self._hidden(self.actor, rollout, self.actor_stream),
                                                                rollout))
            logp, ref_logp, kl, ent = ops.logprobs_and_kl(act_logits, ref_logits, targets, temperature, kl_estimator,
                                                          IGNORE_INDEX)
            del act_logits
        del ref_logits
        h_rm = self._hidden(self.reward_model, rollout, None)
        last = last_token_index(rollout.attention_mask)
        scores = apply_head(self.reward_head, h_rm[torch.arange(h_rm.shape[0], device=h_rm.device), last])
        h_cr = self._hidden(self.critic, rollout, self.critic_stream)
        values = apply_head(self.value_head, response_hidden(h_cr, rollout))
        return Scores.masked(rollout, logp, ref_logp, kl, ent, values, scores)

    def forward(self, rollout, *, temperature: float, need_entropy: bool, roles: tuple[str, ...] = (ACTOR, CRITIC)):
        actor, critic = check_roles(roles)
        m = rollout.response_mask.float()
        logp = ent = values = None
        if actor:
            targets = response_targets(rollout)
            logits = logits_f32(self.actor, response_hidden(self._hidden(self.actor, rollout, self.actor_stream),
                                                            rollout))
            if need_entropy:
                # The logits serve as their own "reference" here: only log-prob and entropy are used.
                logp, _, _, ent = ops.logprobs_and_kl(logits, logits.detach(), targets, temperature, "k1",
                                                      IGNORE_INDEX)
                ent = ent * m
            else:
                logp = ops.token_logprobs(logits, targets, temperature, IGNORE_INDEX)
            logp = logp * m
        if critic:
            values = apply_head(self.value_head, response_hidden(self._hidden(self.critic, rollout,
                                                                              self.critic_stream), rollout)) * m
        return logp, ent, values


class LoRAPPO(SeparatePPO):
    """LoRA-PPO: the actor and the critic copies each carry one adapter."""
    variant = "lora"
    actor_stream = ACTOR
    critic_stream = CRITIC

    @staticmethod
    def make_trainable(actor: nn.Module, critic: nn.Module, cfg) -> None:
        patch_model(actor, adapters=(ACTOR,), **_lora(cfg))
        patch_model(critic, adapters=(CRITIC,), **_lora(cfg))


class FullPPO(SeparatePPO):
    """Full PPO: every weight of the actor and the critic copies trains."""
    variant = "full"

    @staticmethod
    def make_trainable(actor: nn.Module, critic: nn.Module, cfg) -> None:
        actor.requires_grad_(True)
        critic.requires_grad_(True)
        # The critic's LM head takes no part in the value (and the actor needs no value head).
        critic.get_output_embeddings().requires_grad_(False)
        if critic.get_output_embeddings().weight is critic.get_input_embeddings().weight:
            critic.get_input_embeddings().requires_grad_(True)   # tied: the embedding is still used


VARIANTS: dict[str, type[PPOModels]] = {c.variant: c for c in (HydraPPO, JHydraPPO, LoRAPPO, FullPPO)}


def build_ppo_models(model: nn.Module, reward_head: nn.Linear, cfg) -> PPOModels:
    """PPO's models for cfg.variant (a PPOConfig) from the SFT result: `model` (a causal LM) and `reward_head`
    (nn.Linear(D, 1), copied and frozen). hydra / j-hydra patch `model` in place (its base weights are shared,
    so "LoRA off" is the SFT model); lora / full keep it as the frozen reference and add 3 deep copies. Every
    variant switches dropout off in `model` and freezes its base.

    Raises ValueError for a reward head of the wrong shape, an unknown variant, logits the model transforms
    after its head, or a model patched with other adapters than the variant needs. A biased LM head (Phi) is
    applied everywhere: sampling, the fused log-probs and the materialised logits.
    """
    if not isinstance(reward_head, nn.Linear) or reward_head.out_features != 1:
        raise ValueError("reward_head: expected nn.Linear(hidden, 1)")
    if reward_head.in_features != hidden_size(model):
        raise ValueError(f"reward_head: in_features {reward_head.in_features} does not match the model's hidden "
                         f"size {hidden_size(model)}")
    check_plain_logits(model)              # refuse logits transformed after the head (sampled, scored: h·Wᵀ + b)
    if cfg.variant not in VARIANTS:
        raise ValueError(f"variant: unknown PPO variant {cfg.variant!r}")
    return VARIANTS[cfg.variant].build(model, copy.deepcopy(reward_head).float().requires_grad_(False), cfg)


__all__ = ["SharedPPO", "HydraPPO", "JHydraPPO", "SeparatePPO", "LoRAPPO", "FullPPO", "VARIANTS",
           "build_ppo_models", "CriticFree", "PolicyScores", "build_critic_free"]
