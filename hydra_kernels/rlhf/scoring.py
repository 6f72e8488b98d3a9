"""Scoring a rollout (no grad) and the policy/value forward of a PPO update (with grad), per variant.

Response token t (column P + t of the full sequence) is predicted from the hidden state at column P + t − 1;
the value of position t is read there too (the state before token t is emitted). The reward head reads the
hidden state of the last real response token (EOS when there is one).

hydra    scoring: ONE forward with streams (base, actor, critic); ONE linear_logprobs sweep of the LM head
         over (actor, base) gives old log-probs, reference log-probs, KL and entropy; reward from the base
         stream through the reward head; values from the critic stream through the value head.
         update:  one forward with streams (actor, critic).
j-hydra  scoring: streams (base, actor); values from the actor stream. update: stream (actor).
lora / full  four separate forwards (reference, reward model, actor, critic); log-probs and KL from the
         materialised logits (ops.logprobs_and_kl), as the peer frameworks do; the logits are fp32 (as sampled),
         never the bf16 output of a bf16 head.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hydra_kernels import ops
from hydra_kernels.ops.matmul import linear_f32
from hydra_kernels.rlhf.models import ACTOR, BASE, CRITIC, PPOModels, decoder_hidden, lm_head_weight
from hydra_kernels.rlhf.rollout import Rollout

IGNORE_INDEX = -100

linear_logprobs = ops.linear_logprobs


@dataclass
class Scores:
    """Per response token [B, R] (0 off the response mask): the actor's log-probs (the "old" ones), the
    reference's, the KL estimate, the actor's entropy and the critic's values; scores [B]: the reward head."""
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor


def response_targets(rollout: Rollout) -> torch.Tensor:
    return rollout.response_ids.masked_fill(rollout.response_mask == 0, IGNORE_INDEX)


def _response_hidden(h: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """[..., B, L, D] -> [..., B, R, D]: the hidden states that predict each response token."""
    P, R = rollout.prompt_len, rollout.response_ids.shape[1]
    return h[..., P - 1:P + R - 1, :]


def _last_hidden(h: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """[B, L, D] -> [B, D] at each row's last real response token."""
    idx = rollout.prompt_len + rollout.lengths - 1
    return h[torch.arange(h.shape[0], device=h.device), idx]


def _head(head: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
    return head(h.float()).squeeze(-1)


def _fused_logprobs(h_streams: list[torch.Tensor], weight: torch.Tensor, targets: torch.Tensor, temperature: float,
                    kl: str | None):
    """linear_logprobs over response hidden states [S, B, R, D] -> (logp [S, B, R], entropy, kl [B, R] | None).

    The streams go in as a list, so the op knows which of them carry gradients."""
    return linear_logprobs(list(h_streams), weight, targets, temperature=temperature, kl=kl,
                           ignore_index=IGNORE_INDEX)


class _LogitsF32(torch.autograd.Function):
    """h·Wᵀ as fp32 logits (ops.matmul.linear_f32: fp32 accumulation, no fp32 copy of W on CUDA), the same
    function generation samples from (models.PolicyHandle). The backward is a plain linear's in the operands'
    dtype (what the model's own head would give), so nothing but the logits' rounding changes."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        return linear_f32(h, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gh = gw = None
        if ctx.needs_input_grad[0]:
            gh = (g.to(weight.dtype) @ weight).reshape(h.shape).to(h.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g.to(h.dtype).t() @ h.reshape(-1, h.shape[-1])).to(weight.dtype)
        return gh, gw


def _logits(model, h: torch.Tensor) -> torch.Tensor:
    """fp32 logits [..., V] of the LM head. Not the head's own output: in a bf16 model that is rounded to bf16,
    which makes the old log-probs (and the reference's, and the KL) those of another distribution than the one
    the rollout sampled from (DESIGN.md pitfall)."""
    return _LogitsF32.apply(h, lm_head_weight(model))


@torch.no_grad()
def score_rollout(models: PPOModels, rollout: Rollout, *, temperature: float, kl_estimator: str) -> Scores:
    """Old log-probs, reference log-probs, per-token KL, entropy, values and reward-head scores."""
    ids, mask, pos = rollout.input_ids, rollout.attention_mask, rollout.position_ids
    targets = response_targets(rollout)
    m = rollout.response_mask.float()
    if models.shared:
        hydra = models.hydra
        names = (BASE, ACTOR, CRITIC) if models.variant == "hydra" else (BASE, ACTOR)
        h = hydra.forward_streams(ids, mask, names, pos)                       # [S, B, L, D], one forward
        hr = _response_hidden(h, rollout)
        # Stream 0 of the op is the policy, stream 1 the reference: one sweep of W_lm serves both.
        logp, ent, kl = _fused_logprobs([hr[1], hr[0]], lm_head_weight(hydra.model), targets, temperature,
                                        kl_estimator)
        logp, ref_logp, ent = logp[0], logp[1], ent[0]
        scores = hydra.reward(h[0], mask)                  # reward model = LoRA off + reward head
        values = hydra.values(hr[-1])                      # critic stream (j-hydra: the actor stream)
    else:
        lora = models.variant == "lora"
        h_ref, _ = decoder_hidden(models.reference, ids, mask, pos)
        h_act, _ = decoder_hidden(models.actor, ids, mask, pos, (ACTOR,) if lora else None)
        ref_logits = _logits(models.reference, _response_hidden(h_ref[0], rollout))
        act_logits = _logits(models.actor, _response_hidden(h_act[0], rollout))
        logp, ref_logp, kl, ent = ops.logprobs_and_kl(act_logits, ref_logits, targets, temperature,
                                                      kl_estimator, IGNORE_INDEX)
        del ref_logits, act_logits
        h_rm, _ = decoder_hidden(models.reward_model, ids, mask, pos)
        scores = _head(models.reward_head, _last_hidden(h_rm[0], rollout))
        h_cr, _ = decoder_hidden(models.critic, ids, mask, pos, (CRITIC,) if lora else None)
        values = _head(models.value_head, _response_hidden(h_cr[0], rollout))
    return Scores(logp * m, ref_logp * m, kl * m, ent * m, values * m, scores)


def policy_and_values(models: PPOModels, rollout: Rollout, *, temperature: float, need_entropy: bool):
    """The update's forward, with grad: (new log-probs [B, R], entropy [B, R] or None, values [B, R])."""
    ids, mask, pos = rollout.input_ids, rollout.attention_mask, rollout.position_ids
    targets = response_targets(rollout)
    m = rollout.response_mask.float()
    if models.shared:
        hydra = models.hydra
        names = (ACTOR, CRITIC) if models.variant == "hydra" else (ACTOR,)
        h = hydra.forward_streams(ids, mask, names, pos)
        hr = _response_hidden(h, rollout)
        logp, ent, _ = _fused_logprobs([hr[0]], lm_head_weight(hydra.model), targets, temperature, None)
        logp, ent = logp[0], ent[0]
        values = hydra.values(hr[-1])
    else:
        lora = models.variant == "lora"
        h_act, _ = decoder_hidden(models.actor, ids, mask, pos, (ACTOR,) if lora else None)
        logits = _logits(models.actor, _response_hidden(h_act[0], rollout))
        if need_entropy:
            # The logits serve as their own "reference" here: only log-prob and entropy are used.
            logp, _, _, ent = ops.logprobs_and_kl(logits, logits.detach(), targets, temperature, "k1", IGNORE_INDEX)
        else:
            logp, ent = ops.token_logprobs(logits, targets, temperature, IGNORE_INDEX), None
        h_cr, _ = decoder_hidden(models.critic, ids, mask, pos, (CRITIC,) if lora else None)
        values = _head(models.value_head, _response_hidden(h_cr[0], rollout))
    return logp * m, (ent * m if need_entropy and ent is not None else None), values * m


__all__ = ["Scores", "score_rollout", "policy_and_values", "response_targets", "IGNORE_INDEX"]
