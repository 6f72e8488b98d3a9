"""Review tests of ops.lora_linear: the eager no-grad fast path against the custom op.

The fast path (_run_forward called directly when no gradient is needed and nothing is compiling) must give
what the registered op gives, bit for bit, with the same autograd flags, and must not break tracing tools
that rely on the op's fake implementation (FakeTensorMode, make_fx) with a kernel backend.
"""
import importlib

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from hydra_kernels import ops
from hydra_kernels.kernels.triton import triton_interpreting

ll_mod = importlib.import_module("hydra_kernels.ops.lora_linear")     # the package exports the function
needs_interpreter = pytest.mark.skipif(not triton_interpreting(),
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]


def make(rows, K, N, n, r, dtype, adapter_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype)
    A = (torch.randn(n, r, K, generator=g) / K ** 0.5).to(adapter_dtype or dtype)
    B = (torch.randn(n, N, r, generator=g) / r ** 0.5).to(adapter_dtype or dtype)
    return x, w, b, A, B


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, None), (torch.bfloat16, torch.float32),
                                                 (torch.float16, None)])
def test_no_grad_fast_path_equals_the_custom_op(backend, dtype, adapter_dtype):
    x, w, b, A, B = make(2 * 7, 23, 17, 2, 4, dtype, adapter_dtype)
    layout, scaling = (1, 0), [0.5, 1.5]
    want, _ = ll_mod._lora_linear_op(x, w, b, A, B, scaling, layout, backend)
    xg = x.clone().requires_grad_(True)
    Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    with torch.no_grad():                                   # parameters and x require grad, grad is off
        y = ops.lora_linear(xg, w, b, Ag, Bg, scaling, layout, backend=backend)
    assert torch.equal(y, want) and not y.requires_grad and y.dtype == dtype
    with torch.inference_mode():
        y = ops.lora_linear(x, w, b, A, B, scaling, layout, backend=backend)
    assert torch.equal(y, want) and y.is_inference()
    y = ops.lora_linear(x, w, b, A, B, scaling, layout, backend=backend)     # grad on, nothing requires it
    assert torch.equal(y, want) and not y.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_call_under_fake_tensor_mode_and_make_fx(backend):
    """Shape inference with FakeTensorMode and make_fx tracing go through the op's fake implementation and
    record hydra_kernels::lora_linear, as they did before the fast path. With a kernel backend the fast path
    launched the Triton kernel on fake tensors / proxies and failed."""
    x, w, b, A, B = make(2 * 4, 16, 12, 1, 2, torch.float32)
    f = lambda x: ops.lora_linear(x, w, b, A, B, 1.0, (0, -1), backend=backend)   # noqa: E731
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        y = f(mode.from_tensor(x))
    assert isinstance(y, FakeTensor) and y.shape == (8, 12) and y.dtype == torch.float32
    gm = make_fx(f)(x)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "hydra_kernels.lora_linear.default" in targets, targets
    torch.testing.assert_close(gm(x), f(x), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_call_on_real_tensors_inside_fake_tensor_mode(backend):
    """Real inputs passed in under FakeTensorMode(allow_non_fake_inputs=True): the op's fake implementation
    answers (a kernel launched on the fake outputs would fail)."""
    x, w, b, A, B = make(2 * 4, 16, 12, 1, 2, torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with torch.no_grad():
            y = ops.lora_linear(x, w, b, A, B, 1.0, (0, -1), backend=backend)
    assert isinstance(y, FakeTensor) and y.shape == (8, 12) and y.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
def test_make_fx_records_the_custom_op_in_every_tracing_mode(backend, tracing_mode):
    x, w, b, A, B = make(2 * 4, 16, 12, 1, 2, torch.float32)
    f = lambda x, w, b, A, B: ops.lora_linear(x, w, b, A, B, 1.0, (0, -1), backend=backend)   # noqa: E731
    gm = make_fx(f, tracing_mode=tracing_mode)(x, w, b, A, B)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "hydra_kernels.lora_linear.default" in targets, targets
    torch.testing.assert_close(gm(x, w, b, A, B), f(x, w, b, A, B), rtol=0, atol=0)
