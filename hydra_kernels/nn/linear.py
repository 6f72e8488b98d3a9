"""HydraLinear: a frozen linear layer with a stack of LoRA adapters, run as several streams at once."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from hydra_kernels.nn import context
from hydra_kernels.ops import check_lora_args, lora_linear

BASE = "base"


class HydraLinear(nn.Module):
    """y = x·Wᵀ + b, plus scaling·(x·Aᵀ)·Bᵀ of the adapter each stream selects (none for "base").

    Public contract: `weight` [out, in] and `bias` (frozen), `lora_A` Parameter [n_adapters, r, in],
    `lora_B` Parameter [n_adapters, out, r], `scaling` (alpha / r), `adapters` (names), `default_stream`
    (what runs outside a `streams(...)` context), `backend` (None = automatic).

    adapter_dtype: the adapters' dtype; None = fp32 for a bf16 / fp16 weight (master weights, as PEFT does:
    optimizer steps of RLHF-sized learning rates are below a bf16 ulp of most entries), else the weight's.
    The forward rounds fp32 adapters to the input's dtype (ops.lora_linear), so it equals a 16-bit adapter's;
    no-grad forwards inside `rounded_adapters(...)` reuse one rounded copy per layer instead.

    The layer holds no per-call state: the stream layout a forward runs comes from the caller's context
    (`streams(...)`, per thread and asyncio task), the rounded copies from its `rounded_adapters(...)` scope.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 adapters: Sequence[str] = ("actor", "critic"), r: int = 16, alpha: float = 32,
                 lora_dropout: float = 0.0, device=None, dtype=None, adapter_dtype: torch.dtype | None = None):
        super().__init__()
        weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype),
                              requires_grad=False)
        b = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self._setup(weight, b, adapters, r, alpha, lora_dropout, adapter_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, adapters: Sequence[str] = ("actor", "critic"), r: int = 16,
                    alpha: float = 32, lora_dropout: float = 0.0,
                    adapter_dtype: torch.dtype | None = None) -> "HydraLinear":
        """Wrap `linear` without copying its weight (the same Parameter object), and freeze it."""
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear.weight, linear.bias, adapters, r, alpha, lora_dropout, adapter_dtype)
        return self

    def _setup(self, weight, bias, adapters, r, alpha, lora_dropout, adapter_dtype):
        if lora_dropout:
            raise ValueError("lora_dropout: not supported; dropout makes PPO's old and new log-probs disagree")
        adapters, r, alpha = check_lora_args(adapters, r, alpha, reserved=(BASE,))
        weight.requires_grad_(False)
        if bias is not None:
            bias.requires_grad_(False)
        self.weight = weight
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.adapters = adapters
        self.r = r
        self.alpha = float(alpha)
        self.scaling = self.alpha / r
        if adapter_dtype is None:
            adapter_dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
        if adapter_dtype not in (weight.dtype, torch.float32):
            raise ValueError(f"adapter_dtype: must be float32 or the weight's dtype {weight.dtype}, got {adapter_dtype}")
        n, dev, dt = len(adapters), weight.device, adapter_dtype
        self.lora_A = nn.Parameter(torch.empty(n, r, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, r, device=dev, dtype=dt))
        self.reset_lora_parameters()
        self.default_stream = adapters[0] if adapters else BASE
        self.backend: str | None = None
        self._index = {BASE: -1, **{name: i for i, name in enumerate(adapters)}}

    def reset_lora_parameters(self) -> None:
        """Standard LoRA init: A like nn.Linear's weight (per adapter), B zero, so every adapter starts as the base."""
        with torch.no_grad():
            for i in range(self.lora_A.shape[0]):
                nn.init.kaiming_uniform_(self.lora_A[i], a=math.sqrt(5))
            self.lora_B.zero_()

    def stream_indices(self, names: Sequence[str]) -> list[int]:
        try:
            return [self._index[name] for name in names]
        except KeyError as e:
            raise ValueError(f"streams: unknown stream {e.args[0]!r}; this layer has {(BASE,) + self.adapters}") from None

    def current_layout(self) -> tuple[str, ...]:
        """The stream names a forward of this layer runs now, in this thread and asyncio task: those of the
        innermost streams(...) context that covers it, else (default_stream,)."""
        frame = context.layer_frame(self)
        return frame.names if frame is not None else (self.default_stream,)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling·B·A of one adapter, [out, in], in fp32."""
        i = self.stream_indices([adapter])[0]
        if i < 0:
            return torch.zeros(self.weight.shape, device=self.weight.device, dtype=torch.float32)
        return self.scaling * (self.lora_B[i].float() @ self.lora_A[i].float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced: the layout comes from the per-thread mirror (Dynamo guards on it: one graph per layout), and
            # the op rounds fp32 adapters itself.
            names = context.traced_names(self)
            idx = self.stream_indices(names if names is not None else (self.default_stream,))
            return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, idx,
                               backend=self.backend)
        frame = context.layer_frame(self)
        idx = frame.indices[self] if frame is not None else self.stream_indices((self.default_stream,))
        A, B = self.lora_A, self.lora_B
        if A.dtype != x.dtype and not torch.is_grad_enabled():
            A, B = context.rounded_operands(self, x.dtype)
        return lora_linear(x, self.weight, self.bias, A, B, self.scaling, idx, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"adapters={self.adapters}, r={self.r}, alpha={self.alpha:g}")
