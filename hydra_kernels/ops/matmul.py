"""Matmuls with an fp32 result from 16-bit operands, without an fp32 copy of the operands on CUDA.

`a.float() @ b.float()` is the obvious way to get fp32 logits from a bf16 LM head, but it materialises the
whole head in fp32 on every call: 262 MB per decoded token for a 32000 x 2048 head. torch.mm(out_dtype=float32)
(CUDA, recent torch) accumulates in fp32 and writes fp32 straight from the 16-bit operands; elsewhere (CPU, or a
torch without it) the copy is the fallback.
"""
from __future__ import annotations

import torch

from hydra_kernels.ops._checks import check_tensor


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D a, b with fp32 output and fp32 accumulation (inputs may be 16-bit); differentiable (with
    grad the CUDA path copies the operands to fp32, as the CPU one always does)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    # torch.mm(out_dtype=...) has no derivative (its result's grad_fn raises "derivative for aten::mm is not
    # implemented" in backward), so it serves only products that autograd does not record.
    recorded = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
    if a.is_cuda and a.dtype == b.dtype and not recorded:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            pass
    return a.float() @ b.float()


def linear_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) in fp32 ([..., in] -> [..., out]) through mm_f32. ValueError for a weight or
    bias FSDP2 has not gathered (a DTensor: read it inside integrations.fsdp.gathered_call)."""
    check_tensor("weight", weight)
    if bias is not None:
        check_tensor("bias", bias)
    out = mm_f32(x.reshape(-1, x.shape[-1]), weight.t()).reshape(*x.shape[:-1], weight.shape[0])
    return out if bias is None else out + bias.float()


__all__ = ["mm_f32", "linear_f32"]
