"""Lean activations: a transformers decoder's RMSNorms and gated MLPs keep less for backward, same values.

Under grad, a Llama-style decoder layer saves ~43 bytes per token per hidden unit (bf16, LoRA on every linear);
a fifth of that are tensors the backward can recompute for almost nothing:
- RMSNorm (transformers' LlamaRMSNorm and its copies) saves the fp32 upcast of its input (4 bytes per unit);
  recomputed in backward it keeps its bf16 input instead (2; the residual stream is not otherwise kept);
- the gated MLP's act_fn(gate) * up saves the activation's output besides gate and up (2 bytes per intermediate
  unit, 5.4 per hidden unit at Llama's 11008 / 4096); recomputed from gate and up, only those stay. With SiLU
  (_SiluMul) its backward also works in place: 4 intermediate-sized tensors at its peak instead of 6.
Each runs under torch.utils.checkpoint (non-reentrant), or _SiluMul, whenever grad mode is on: forward and
gradients are the same ops on the same inputs, so they are bitwise those of the plain modules. Under no_grad
nothing changes.

Only classes whose forward is exactly that computation are touched (LEAN_NORMS, LEAN_MLPS: Llama, Mistral, Qwen2,
Qwen3); others (GPT-2's LayerNorm, Gemma's (1 + weight) norm) are left as they are. As activation_checkpointing
does, the wrapper is a bound method in the module's __dict__: state_dict keys do not change, copy.deepcopy
rebinds it. Parameters DeepSpeed ZeRO-3 manages run the plain forward (its hooks gather them per call only).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from hydra_kernels.integrations.fsdp import is_zero3

__all__ = ["enable_lean_activations", "disable_lean_activations", "lean_activations_enabled", "LEAN_NORMS",
           "LEAN_MLPS"]

# transformers classes whose forward is LlamaRMSNorm's (x.float() · rsqrt(mean x² + eps), cast back, · weight) ...
LEAN_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
# ... and LlamaMLP's (down_proj(act_fn(gate_proj(x)) * up_proj(x))).
LEAN_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")
_FLAG = "_hydra_lean_activations"


def _recompute(module: nn.Module, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad and not any(is_zero3(p) for p in module.parameters())


def _lean_norm_forward(self, hidden_states):
    plain = type(self).forward
    if not _recompute(self, hidden_states):
        return plain(self, hidden_states)
    return checkpoint(plain, self, hidden_states, use_reentrant=False)


def _act_mul(act_fn, gate, up):
    return act_fn(gate) * up


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up saving gate and up only. Its backward needs 4 [tokens, intermediate] tensors (gate, up, the
    incoming gradient, one more) where autograd through a recomputation needs 6: d gate goes into a new tensor,
    then silu(gate) and d up overwrite the saved gate. The gradients are autograd's bit for bit (the same ops).
    Overwriting a saved tensor bumps its version: a second backward through the same graph raises autograd's
    "modified by an inplace operation" error instead of reading it."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        d_gate = grad * up
        torch.ops.aten.silu_backward.grad_input(d_gate, gate, grad_input=d_gate)
        d_up = F.silu(gate, inplace=True).mul_(grad)
        return d_gate, d_up


SILU_ACTS = ("SiLU", "SiLUActivation")      # torch's and transformers' modules computing F.silu


def _lean_mlp_forward(self, x):
    if not _recompute(self, x):
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    if type(self.act_fn).__name__ in SILU_ACTS and gate.requires_grad and up.requires_grad:
        return self.down_proj(_SiluMul.apply(gate, up))
    return self.down_proj(checkpoint(_act_mul, self.act_fn, gate, up, use_reentrant=False))


def enable_lean_activations(model: nn.Module) -> int:
    """Recompute the RMSNorms' and the gated MLPs' cheap intermediates in backward (see the module docstring).
    Idempotent; returns the number of modules changed (0 for a model with none of LEAN_NORMS / LEAN_MLPS)."""
    n = 0
    for module in model.modules():
        name = type(module).__name__
        forward = _lean_norm_forward if name in LEAN_NORMS else _lean_mlp_forward if name in LEAN_MLPS else None
        if forward is not None:
            module.forward = types.MethodType(forward, module)
            setattr(module, _FLAG, True)
            n += 1
    return n


def disable_lean_activations(model: nn.Module) -> None:
    """Undo enable_lean_activations (a no-op where it was never enabled)."""
    for module in model.modules():
        if module.__dict__.pop(_FLAG, False):
            module.__dict__.pop("forward", None)


def lean_activations_enabled(model: nn.Module) -> bool:
    """True when enable_lean_activations is in effect on any module of `model`."""
    return any(module.__dict__.get(_FLAG, False) for module in model.modules())
