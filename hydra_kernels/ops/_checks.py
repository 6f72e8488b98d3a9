"""Argument checks shared by every op (each raises ValueError naming the offending argument), and plain_eager."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None,
                 contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name}: dtype {t.dtype} not supported (expected one of {list(dtypes)})")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected {device} (all inputs must share a device)")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous (call .contiguous())")


def check_same_dtype(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != ref.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from {ref_name}'s {ref.dtype}")


def check_positive_float(name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a number, got {value!r}") from None
    if not v > 0 or v != v or v == float("inf"):
        raise ValueError(f"{name}: must be a finite positive number, got {value!r}")
    return v


def plain_eager(x: torch.Tensor) -> bool:
    """Neither torch.compile nor a dispatch mode (FakeTensorMode, make_fx's proxy mode, ...) is tracing, and x is a
    plain tensor: only then may an op look at values on the host (a data-dependent check) or bypass its custom
    op (whose fake implementation those tools need: a kernel launched on fake tensors or proxies fails)."""
    return (not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
            and type(x) is torch.Tensor)


def check_target_values(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """targets in [0, V) or == ignore_index, else ValueError: one small reduction and a host sync (an out-of-range
    target would otherwise turn into NaN outputs, or an out-of-bounds read). Skipped where values cannot be read
    or a sync is not allowed: while tracing (torch.compile, a dispatch mode) and while a CUDA graph is captured."""
    if targets.numel() == 0 or not plain_eager(targets):
        return
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    # In int64, as the kernels compare: a narrow dtype would wrap ignore_index (uint8: -100 -> 156).
    t = targets if targets.dtype == torch.int64 else targets.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= V))
    if bool(bad.any()):
        raise ValueError(f"targets: values must lie in [0, {V}) (the vocabulary) or equal ignore_index={ignore_index}")
