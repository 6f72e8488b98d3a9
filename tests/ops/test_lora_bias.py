"""Review test of ops.lora_linear: a bias that is a strided view, on every backend, against float64."""
import pytest
import torch

from hydra_kernels import ops, reference
from hydra_kernels.kernels.triton import triton_interpreting
from tests._util import assert_rel_close

needs_interpreter = pytest.mark.skipif(not triton_interpreting(),
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]


def make(rows, K, N, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    A = torch.randn(n, r, K, generator=g) / K ** 0.5
    B = torch.randn(n, N, r, generator=g) / r ** 0.5
    return x, w, A, B


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bias(backend):
    """A bias that is a strided view (every other element of a buffer) is read with its stride. The Triton
    kernel indexed bias_ptr + n, so it read the buffer's elements 0..N-1 instead (wrong outputs, no error)."""
    x, w, A, B = make(3 * 5, 19, 13, 2, 3)
    buf = torch.randn(2 * 13, generator=torch.Generator().manual_seed(9))
    bias = buf[::2]
    assert not bias.is_contiguous()
    layout = (1, -1, 0)
    ref = reference.lora_linear(x.double(), w.double(), bias.double(), A.double(), B.double(), [0.5, 2.0], layout)
    y = ops.lora_linear(x, w, bias, A, B, [0.5, 2.0], layout, backend=backend)
    assert_rel_close(y, ref, torch.float32, "y")
