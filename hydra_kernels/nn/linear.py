"""HydraLinear: a frozen linear layer with a stack of LoRA adapters, run as several streams at once."""
from __future__ import annotations

import math
from collections import deque
from typing import Sequence

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.checkpoint import CheckpointFunction

from hydra_kernels.ops import lora_linear

BASE = "base"
# Layout records kept per layer for activation-checkpoint recomputation (see HydraLinear.current_layout).
# A record is only needed until its graph runs backward; a graph older than this many forwards of the same
# layer that is recomputed raises instead of guessing.
_LAYOUT_HISTORY = 256

# Number of optimizer steps taken so far (any torch.optim.Optimizer): part of the key of HydraLinear's rounded
# adapter cache. Fused optimizers (fused=True; transformers' default adamw_torch_fused) and other multi-tensor
# kernels update parameters in place without bumping their version counters.
_optimizer_steps = 0


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


class HydraLinear(nn.Module):
    """y = x·Wᵀ + b, plus scaling·(x·Aᵀ)·Bᵀ of the adapter each stream selects (none for "base").

    Public contract: `weight` [out, in] and `bias` (frozen), `lora_A` Parameter [n_adapters, r, in],
    `lora_B` Parameter [n_adapters, out, r], `scaling` (alpha / r), `adapters` (names), `default_stream`
    (what runs outside a `streams(...)` context), `backend` (None = automatic).

    adapter_dtype: the adapters' dtype; None = fp32 for a bf16 / fp16 weight (master weights, as PEFT does:
    optimizer steps of RLHF-sized learning rates are below a bf16 ulp of most entries), else the weight's.
    The forward rounds fp32 adapters to the input's dtype (ops.lora_linear), so it equals a 16-bit adapter's.
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
        adapters = tuple(adapters)
        if lora_dropout:
            raise ValueError("lora_dropout: not supported; dropout makes PPO's old and new log-probs disagree")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r: LoRA rank must be a positive int, got {r!r}")
        if len(set(adapters)) != len(adapters) or BASE in adapters or not all(isinstance(a, str) and a for a in adapters):
            raise ValueError(f"adapters: need distinct non-empty names other than {BASE!r}, got {adapters!r}")
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
        self._stream_layout: tuple[str, ...] | None = None   # set by hydra_kernels.streams(...)
        # (autograd sequence number when the forward ran, layout): grad-mode and no-grad forwards apart.
        self._layouts_grad: deque = deque(maxlen=_LAYOUT_HISTORY)
        self._layouts_nograd: deque = deque(maxlen=_LAYOUT_HISTORY)
        self._rounded_adapters: tuple | None = None          # see _adapter_operands

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
        """The stream names this forward runs.

        Inside a backward pass a forward is an activation-checkpoint recomputation: it must repeat the layout
        of the original forward, although the `streams` context may have exited and other forwards with other
        layouts may have run since. Every forward is therefore stamped with autograd's sequence counter; the
        recomputation looks at the backward node that triggered it (torch._C._current_autograd_node):
        - non-reentrant checkpoint: that node was created inside the checkpointed region, after this layer's
          forward there, so the layer's latest grad-mode record with stamp <= node's sequence number is it;
        - reentrant checkpoint: the node is CheckpointFunction's own; the region ran under no_grad right after
          that node was created, so this layer's records there carry stamp == node's sequence number + 1.
        """
        if torch._C._current_graph_task_id() == -1:                 # an ordinary forward
            layout = self._stream_layout or (self.default_stream,)
            log = self._layouts_grad if torch.is_grad_enabled() else self._layouts_nograd
            log.append((torch.autograd._get_sequence_nr(), layout))
            return layout
        return self._recomputed_layout()

    def _recomputed_layout(self) -> tuple[str, ...]:
        node = torch._C._current_autograd_node()
        if node is None:
            raise RuntimeError("HydraLinear: forward inside backward with no autograd node to match its layout")
        seq = node._sequence_nr()
        if getattr(node, "_forward_cls", None) is CheckpointFunction:     # reentrant checkpoint
            for stamp, layout in self._layouts_nograd:
                if stamp == seq + 1:
                    return layout
        else:
            for stamp, layout in reversed(self._layouts_grad):
                if stamp <= seq:
                    return layout
        raise RuntimeError(
            "HydraLinear: cannot find the stream layout of the forward being recomputed (more than "
            f"{_LAYOUT_HISTORY} forwards of this layer since it ran); run backward sooner")

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling·B·A of one adapter, [out, in], in fp32."""
        i = self.stream_indices([adapter])[0]
        if i < 0:
            return torch.zeros(self.weight.shape, device=self.weight.device, dtype=torch.float32)
        return self.scaling * (self.lora_B[i].float() @ self.lora_A[i].float())

    def _adapter_operands(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """lora_A, lora_B for ops.lora_linear. With grad enabled, the Parameters themselves (the op rounds fp32
        ones to x's dtype and returns fp32 gradients). Without, fp32 adapters are rounded once and the copy is
        reused until a parameter changes: decoding would otherwise round every adapter of every layer at every
        token. A change is an in-place update (it bumps the version), a new tensor (another data pointer) or any
        optimizer step (fused optimizers bump no versions). Writes through `.data` bypass version counting:
        after `p.data.copy_(...)` outside an optimizer, set `layer._rounded_adapters = None`."""
        A, B = self.lora_A, self.lora_B
        if A.dtype == dtype or torch.is_grad_enabled():
            return A, B
        key = (dtype, A._version, B._version, A.data_ptr(), B.data_ptr(), _optimizer_steps)
        if self._rounded_adapters is None or self._rounded_adapters[0] != key:
            self._rounded_adapters = (key, A.detach().to(dtype), B.detach().to(dtype))
        return self._rounded_adapters[1], self._rounded_adapters[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # Traced by torch.compile: the layout is a plain attribute (Dynamo guards on it, one graph per layout)
            # and the parameters go to the op as they are (it rounds fp32 adapters itself). The eager bookkeeping
            # (autograd sequence stamps for checkpoint recomputation, the rounded-adapter cache keyed on data
            # pointers) cannot be traced, and is not needed: a compiled backward replays its own graph.
            idx = self.stream_indices(self._stream_layout or (self.default_stream,))
            return lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling, idx,
                               backend=self.backend)
        idx = self.stream_indices(self.current_layout())
        A, B = self._adapter_operands(x.dtype)
        return lora_linear(x, self.weight, self.bias, A, B, self.scaling, idx, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"adapters={self.adapters}, r={self.r}, alpha={self.alpha:g}")
