"""Argument checks shared by the ops and the layers above them (each raises ValueError naming the offending
argument), and plain_eager."""
from __future__ import annotations

import math
import numbers

import torch
from torch.fx.experimental.proxy_tensor import get_proxy_mode

from hydra_kernels.kernels.kl import KL_ESTIMATORS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def _is_dtensor(t) -> bool:
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:    # the common case, without the import
        return False
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=None, device=None,
                 contiguous: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if _is_dtensor(t):
        raise ValueError(f"{name}: a sharded DTensor (a parameter FSDP2 has not gathered); call the op inside the "
                         "module's forward, or through integrations.fsdp.gathered_call, which gathers it")
    if getattr(t, "ds_id", None) is not None and t.numel() == 0 and getattr(t, "ds_numel", 0) > 0:
        raise ValueError(f"{name}: a parameter DeepSpeed ZeRO-3 has partitioned (shape {tuple(t.ds_shape)}, empty "
                         "here); call the op inside the module's forward, or through integrations.fsdp.gathered_call("
                         "..., lm_head=True) with integrations.fsdp.whole(weight)")
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


def check_real(name: str, value) -> float:
    """value as a finite Python float. Only real numbers are accepted (int, float, numpy scalars): a str ("0.7"),
    a bool (True is no scaling) or None is refused rather than converted."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    return v


def check_positive_float(name: str, value) -> float:
    """value as a finite positive Python float (see check_real for what counts as a number)."""
    v = check_real(name, value)
    if not v > 0:
        raise ValueError(f"{name}: must be a finite positive number, got {value!r}")
    return v


def check_positive_int(name: str, value) -> int:
    """value as a positive Python int (int or numpy integer; bool and float refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: must be a positive int, got {value!r}")
    return int(value)


def check_lora_args(adapters, r, alpha, *, reserved: tuple[str, ...] = ()) -> tuple[tuple[str, ...], int, float]:
    """The LoRA settings of a layer or a model, checked: (adapters as a tuple, r, alpha as a float).

    adapters: a sequence of distinct non-empty names, none of them in `reserved` (the base stream's name); a
        single str is refused ("actor" would become five adapters 'a', 'c', ...).
    r: a positive int (a bool is refused: True is no rank). alpha: a finite positive number (not a str).
    Raises ValueError naming adapters, r or alpha.
    """
    if isinstance(adapters, (str, bytes)):
        raise ValueError(f"adapters: expected a sequence of adapter names, got the string {adapters!r} "
                         f"(write ({adapters!r},) for one adapter)")
    try:
        names = tuple(adapters)
    except TypeError:
        raise ValueError(f"adapters: expected a sequence of adapter names, got {adapters!r}") from None
    if (len(set(names)) != len(names) or any(n in reserved for n in names)
            or not all(isinstance(n, str) and n for n in names)):
        raise ValueError("adapters: need distinct non-empty names" +
                         (f" other than {', '.join(map(repr, reserved))}" if reserved else "") + f", got {names!r}")
    return names, check_positive_int("r", r), check_positive_float("alpha", alpha)


def check_temperature(temperature) -> float:
    """temperature as a finite positive Python float (int, float or numpy scalar; a str such as "0.7" or a bool
    is refused). A tensor is refused: the kernels take it as a compile-time constant, and reading a tensor's
    value would sync (or break a torch.compile graph)."""
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
