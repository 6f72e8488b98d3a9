"""kernels/kl.py, the one home of the KL estimators: names, the kernels' mode ids, the torch formulas.

The formulas are checked against hydra_kernels.reference (its own derivation) in float64, their derivatives
against autograd through the reference, and the mode ids against csrc's enum KlMode.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hydra_kernels import ops, reference
from hydra_kernels.kernels import kl as home

ROOT = Path(__file__).resolve().parents[2]


def test_names_and_mode_ids():
    assert home.KL_ESTIMATORS == home.SAMPLED_KL_ESTIMATORS + ("full",)
    assert ops.KL_ESTIMATORS is home.KL_ESTIMATORS
    assert set(home.KL_MODES) == {"none", *home.KL_ESTIMATORS}
    assert sorted(home.KL_MODES.values()) == list(range(len(home.KL_MODES))) and home.KL_MODES["none"] == 0
    assert all(home.kl_mode(k) == v for k, v in home.KL_MODES.items())


@pytest.mark.parametrize("bad", ["k4", None, "K1", 3])
def test_unknown_mode_is_a_value_error(bad):
    with pytest.raises(ValueError, match="^kl: "):
        home.kl_mode(bad)
    with pytest.raises(ValueError, match="^kl: "):
        home.sampled_kl(torch.zeros(1), bad)
    with pytest.raises(ValueError, match="^kl: "):
        home.sampled_kl_grad(torch.zeros(1), bad)


def test_mode_ids_are_those_of_csrc():
    """csrc/hydra_kernels.h spells the same ids for the CUDA kernels (C++ cannot import them)."""
    header = (ROOT / "csrc" / "hydra_kernels.h").read_text()
    body = re.search(r"enum KlMode : int \{([^}]*)\}", header).group(1)
    ids = {name: int(v) for name, v in re.findall(r"kKl(\w+) = (\d+)", body)}
    assert ids == {("K" + k[1:] if k[0] == "k" else k.capitalize()): v for k, v in home.KL_MODES.items()}


@pytest.mark.parametrize("kl", home.SAMPLED_KL_ESTIMATORS)
def test_sampled_formulas_and_derivatives_against_the_reference(kl):
    g = torch.Generator().manual_seed(3)
    # Both signs, tiny and large log-ratios (k3 near d = 0 is where cancellation would show).
    logp = (torch.randn(257, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    ref_logp = logp.detach() + torch.cat([torch.randn(128, generator=g, dtype=torch.float64) * 1e-5,
                                          torch.randn(129, generator=g, dtype=torch.float64) * 3])
    want = reference.kl_estimate(logp, ref_logp, kl)
    (dwant,) = torch.autograd.grad(want.sum(), logp)
    d = ref_logp - logp.detach()
    torch.testing.assert_close(home.sampled_kl(d, kl), want.detach(), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(home.sampled_kl_grad(d, kl), dwant, rtol=1e-12, atol=1e-15)
