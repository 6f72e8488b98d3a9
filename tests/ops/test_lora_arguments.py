"""Review test: ops.lora_linear's scaling and stream_adapters are read as numbers, and bad ones raise a
ValueError naming the argument (the house rule). A numpy float32 scaling (a real number) raised
"TypeError: 'numpy.float32' object is not iterable"; None raised TypeError; a float adapter index 0.7 was
silently truncated to adapter 0."""
import numpy as np
import pytest
import torch

from hydra_kernels import ops, reference
from tests._util import assert_rel_close


def make(rows=4, K=7, N=5, n=2, r=2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g), torch.randn(n, r, K, generator=g),
            torch.randn(n, N, r, generator=g))


@pytest.mark.parametrize("scaling", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 0.5,
                                     [np.float32(0.5), 0.5], np.array([0.5, 0.5], dtype=np.float32)])
def test_numeric_scaling_types(scaling):
    x, w, A, B = make()
    ref = reference.lora_linear(x.double(), w.double(), None, A.double(), B.double(), [0.5, 0.5], (0, 1))
    y = ops.lora_linear(x, w, None, A, B, scaling, (0, 1), backend="torch")
    assert_rel_close(y, ref, torch.float32, "y")


@pytest.mark.parametrize("scaling,stream_adapters,name", [
    (None, (0, 1), "scaling"),
    ("0.5", (0, 1), "scaling"),
    ([0.5, None], (0, 1), "scaling"),
    (0.5, None, "stream_adapters"),
    (0.5, (0.7, 1), "stream_adapters"),
    (0.5, ("0", 1), "stream_adapters"),
])
def test_bad_scaling_or_stream_adapters_name_the_argument(scaling, stream_adapters, name):
    x, w, A, B = make()
    with pytest.raises(ValueError, match=rf"^{name}:"):
        ops.lora_linear(x, w, None, A, B, scaling, stream_adapters, backend="torch")
