"""Every Triton launch runs under kernels.triton.device_guard (Triton launches on the *current* device: inputs on
cuda:1 with cuda:0 current would fault). The wiring is checked on CPU by recording the guard's calls."""
import collections
import contextlib

import pytest
import torch

from hydra_kernels import ops
from hydra_kernels.kernels.triton import device_guard, triton_interpreting

pytestmark = pytest.mark.skipif(not triton_interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


@pytest.fixture
def guarded(monkeypatch):
    from hydra_kernels.kernels.triton import linear_logprobs, logprobs, lora_linear
    seen = []

    def recorder(module):
        def guard(t):
            seen.append((module.__name__.rsplit(".", 1)[1], t.device))
            return contextlib.nullcontext()
        return guard
    for module in (linear_logprobs, logprobs, lora_linear):
        monkeypatch.setattr(module, "device_guard", recorder(module))
    return seen


def test_every_launcher_is_guarded(guarded):
    x = torch.randn(2, 3, 40, requires_grad=True)
    t = torch.randint(0, 40, (2, 3))
    ops.token_logprobs(x, t, backend="triton").sum().backward()
    h, w = torch.randn(6, 16, requires_grad=True), torch.randn(40, 16)
    ops.linear_logprobs(h, w, t.reshape(-1), backend="triton")[0].sum().backward()
    xl = torch.randn(4, 16, requires_grad=True)
    A, B = torch.randn(1, 4, 16, requires_grad=True), torch.randn(1, 8, 4, requires_grad=True)
    ops.lora_linear(xl, torch.randn(8, 16), None, A, B, 1.0, (0,), backend="triton").sum().backward()
    launched = collections.Counter(name for name, _ in guarded)
    # logprobs: forward + backward kernel; linear_logprobs: forward + dz; lora_linear: forward, dx, two wgrads.
    assert launched == {"logprobs": 2, "linear_logprobs": 2, "lora_linear": 4}, launched
    assert all(device == torch.device("cpu") for _, device in guarded)


def test_guard_is_a_no_op_for_cpu_tensors():
    with device_guard(torch.zeros(1)):
        pass
