"""Shared test helpers: tolerances per dtype and a relative error against float64 references."""
import torch

# Max |out − ref| / max|ref| allowed for a result computed in `dtype` from inputs rounded to `dtype`.
REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().clamp_min(1e-30)
    return ((out - ref).abs().max() / scale).item()


def assert_rel_close(out, ref, dtype, what="", factor=1.0):
    err = rel_err(out, ref)
    tol = REL_TOL[dtype] * factor
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g} ({dtype})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so a kernel that forgets to write an element is caught."""
    return t.fill_(float("nan"))
