"""The pieces a variant scores a rollout with: Scores, response targets and hidden states, fp32 logits.

Response token t (column P + t of the full sequence) is predicted from the hidden state at column P + t − 1;
the value of position t is read there too (the state before token t is emitted). The reward head reads the
hidden state of the last real response token (EOS when there is one).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hydra_kernels.integrations.fsdp import gathered_call, whole
from hydra_kernels.integrations.hydra_model import lm_head_bias, lm_head_weight
from hydra_kernels.ops.matmul import linear_f32
from hydra_kernels.rlhf.rollout import Rollout

IGNORE_INDEX = -100


@dataclass
class Scores:
    """Per response token [B, R] (0 off the response mask): the actor's log-probs (the "old" ones), the
    reference's, the KL estimate, the actor's entropy and the critic's values (None without a critic);
    scores [B]: the reward head's."""
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    kl: torch.Tensor
    entropy: torch.Tensor
    values: torch.Tensor | None
    scores: torch.Tensor

    @classmethod
    def masked(cls, rollout: Rollout, logprobs, ref_logprobs, kl, entropy, values, scores) -> "Scores":
        """Scores with every per-token tensor [B, R] multiplied by the rollout's response mask."""
        m = rollout.response_mask.float()
        return cls(logprobs * m, ref_logprobs * m, kl * m, entropy * m, None if values is None else values * m,
                   scores)


def response_targets(rollout: Rollout) -> torch.Tensor:
    """[B, R]: the response tokens, IGNORE_INDEX off the response mask."""
    return rollout.response_ids.masked_fill(rollout.response_mask == 0, IGNORE_INDEX)


def response_hidden(h: torch.Tensor, rollout: Rollout) -> torch.Tensor:
    """[..., B, L, D] -> [..., B, R, D]: the hidden states that predict each response token."""
    P, R = rollout.prompt_len, rollout.response_ids.shape[1]
    return h[..., P - 1:P + R - 1, :]


def apply_head(head: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
    """A scalar head (reward or value, fp32) on hidden states [..., D] -> [...]."""
    return head(h.float()).squeeze(-1)


class _LogitsF32(torch.autograd.Function):
    """h·Wᵀ + b as fp32 logits (ops.matmul.linear_f32: fp32 accumulation, no fp32 copy of W on CUDA), the same
    function generation samples from (models.PolicyHandle). The backward is a plain linear's in the operands'
    dtype (what the model's own head would give), so nothing but the logits' rounding changes."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return linear_f32(h, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gh = gw = gb = None
        if ctx.needs_input_grad[0]:
            gh = (g.to(weight.dtype) @ weight).reshape(h.shape).to(h.dtype)
        if ctx.needs_input_grad[1]:
            gw = (g.to(h.dtype).t() @ h.reshape(-1, h.shape[-1])).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            gb = g.sum(0).to(ctx.bias_dtype)
        return gh, gw, gb


def logits_f32(model, h: torch.Tensor) -> torch.Tensor:
    """fp32 logits [..., V] of the model's LM head on hidden states h [..., D]. Not the head's own output: in a
    bf16 model that is rounded to bf16, which makes the old log-probs (and the reference's, and the KL) those
    of another distribution than the one the rollout sampled from (DESIGN.md pitfall)."""
    # The head is read inside the call: under FSDP2 (integrations.fsdp) it is gathered there.
    return gathered_call(model, lambda: _LogitsF32.apply(h, whole(lm_head_weight(model, allow_bias=True)),
                                                         whole(lm_head_bias(model))), lm_head=True)


__all__ = ["Scores", "response_targets", "response_hidden", "apply_head", "logits_f32", "IGNORE_INDEX"]
