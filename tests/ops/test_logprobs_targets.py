"""The eager target check of ops.token_logprobs / ops.logprobs_and_kl with uint8 targets.

Targets are compared with ignore_index in int64: a uint8 target of 156 is out of range for V <= 156 and raises
ValueError; it is not the wrapped -100 (uint8 156) and so never "ignored".
"""
import pytest
import torch

from hydra_kernels import ops
from hydra_kernels.kernels.triton import triton_interpreting

needs_interpreter = pytest.mark.skipif(not triton_interpreting(),
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_target_equal_to_wrapped_ignore_index_is_rejected(backend):
    V = 100
    x = torch.randn(2, V)
    r = torch.randn(2, V)
    t = torch.tensor([3, 156], dtype=torch.uint8)             # 156 == uint8(-100), outside [0, 100)
    with pytest.raises(ValueError, match="^targets:"):
        ops.token_logprobs(x, t, backend=backend)
    with pytest.raises(ValueError, match="^targets:"):
        ops.logprobs_and_kl(x, r, t, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_inference_under_fake_tensor_mode(backend):
    """Under FakeTensorMode (shape inference) the ops run their fake implementations, as ops.linear_logprobs
    does. The eager target check read a value from the targets (bool(bad.any())) and raised
    DataDependentOutputException there; like under torch.compile it is skipped under a dispatch mode."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    with FakeTensorMode():
        x, r = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
        t = torch.zeros(2, 3, dtype=torch.long)
        lp = ops.token_logprobs(x, t, backend=backend)
        outs = ops.logprobs_and_kl(x, r, t, 0.5, "full", backend=backend)
    for o in (lp, *outs):
        assert isinstance(o, FakeTensor) and o.shape == (2, 3) and o.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_inputs_inside_fake_tensor_mode(backend):
    """Real tensors made outside a FakeTensorMode(allow_non_fake_inputs=True) and passed in under it: the ops
    answer with their fake implementations, and the target check reads no values (the mode fakes every result)."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    x, r = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    t = torch.randint(0, 7, (2, 3))
    h, w = torch.randn(2, 6, 4), torch.randn(7, 4)
    with FakeTensorMode(allow_non_fake_inputs=True):
        lp = ops.token_logprobs(x, t, backend=backend)
        outs = ops.logprobs_and_kl(x, r, t, 0.5, "k3", backend=backend)
        lin = ops.linear_logprobs(h, w, t.reshape(-1), kl="k3", backend=backend)
    for o in (lp, *outs):
        assert isinstance(o, FakeTensor) and o.shape == (2, 3) and o.dtype == torch.float32
    assert all(isinstance(o, FakeTensor) for o in lin) and lin[0].shape == (2, 6) and lin[2].shape == (6,)


@pytest.mark.gpu
@pytest.mark.parametrize("op", ["token_logprobs", "linear_logprobs"])
def test_capture_in_a_cuda_graph(op):
    """The target check syncs with the host; under CUDA graph capture (where a sync raises) it is skipped, for
    both log-prob ops (ops/_checks.check_target_values)."""
    V, D = 64, 32
    x = torch.randn(2, 5, V, device="cuda")
    h, w = torch.randn(10, D, device="cuda"), torch.randn(V, D, device="cuda")
    t = torch.randint(0, V, (2, 5), device="cuda")
    run = (lambda: ops.token_logprobs(x, t)) if op == "token_logprobs" else \
        (lambda: ops.linear_logprobs(h, w, t.reshape(-1))[0])
    expected = run()                                      # eager: checked; also warms up (compiles) the kernel
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, expected)
