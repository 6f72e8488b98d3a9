"""Argument checks shared by the ops (each raises ValueError naming the offending argument), and plain_eager."""
from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from hydra_kernels.kernels.kl import KL_ESTIMATORS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


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


def check_temperature(temperature) -> float:
    """temperature as a finite positive Python float. A tensor is refused: the kernels take it as a compile-time
    constant, and reading a tensor's value would sync (or break a torch.compile graph)."""
    if isinstance(temperature, torch.Tensor):
        raise ValueError("temperature: pass a Python float, not a tensor (it is a compile-time kernel constant)")
    return check_positive_float("temperature", temperature)


def check_ignore_index(ignore_index) -> int:
    """ignore_index as an int (bool, float and others refused)."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index: expected an int, got {ignore_index!r}")
    return ignore_index


def check_kl(kl, *, allow_none: bool) -> None:
    """kl is one of kernels.kl.KL_ESTIMATORS (or None where allow_none)."""
    if kl is None and allow_none:
        return
    if kl not in KL_ESTIMATORS:
        expected = f"None or one of {KL_ESTIMATORS}" if allow_none else f"one of {KL_ESTIMATORS}"
        raise ValueError(f"kl: unknown estimator {kl!r} (expected {expected})")


def plain_eager(t: torch.Tensor) -> bool:
    """Nothing traces this call: torch.compile is not compiling, no make_fx / export proxy mode is active, and
    t is a plain tensor, not a FakeTensor (or other subclass). Only then may an op read values on the host (a
    data-dependent check) or bypass its custom op (whose fake implementation those tools need: a kernel
    launched on fake tensors or proxies fails).

    Pass a tensor that an op of this call produced (a view or a reshape of an input will do), not an input as
    given: under FakeTensorMode every op returns a FakeTensor, also from real inputs, so such a tensor reveals
    the mode where an input created outside it would not."""
    return not torch.compiler.is_compiling() and get_proxy_mode() is None and type(t) is torch.Tensor


def check_target_values(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """targets in [0, V) or == ignore_index, else ValueError: one small reduction and a host sync (an out-of-range
    target would otherwise turn into NaN outputs, or an out-of-bounds read). Skipped where values cannot be read
    or a sync is not allowed: while tracing (torch.compile, make_fx, FakeTensorMode) and while a CUDA graph is
    captured."""
    if targets.numel() == 0 or not plain_eager(targets):
        return
    if targets.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    # In int64, as the kernels compare: a narrow dtype would wrap ignore_index (uint8: -100 -> 156).
    t = targets if targets.dtype == torch.int64 else targets.long()
    bad = (t != ignore_index) & ((t < 0) | (t >= V))
    if not plain_eager(bad):        # a FakeTensorMode entered around real targets: no values to read
        return
    if bool(bad.any()):
        raise ValueError(f"targets: values must lie in [0, {V}) (the vocabulary) or equal ignore_index={ignore_index}")
