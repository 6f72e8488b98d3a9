"""ops.lora_linear against reference.lora_linear (float64), forward and backward, every backend on CPU; its
argument checks, strided biases, and the eager no-grad fast path."""
import importlib

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from hydra_kernels import ops, reference
from hydra_kernels.kernels.triton import triton_interpreting
from tests._util import assert_rel_close

ll_mod = importlib.import_module("hydra_kernels.ops.lora_linear")     # the package exports the function


# --- forward and backward against float64 ---

# These run on CPU tensors: Triton needs the interpreter, which conftest turns on only where no GPU exists.
# On a GPU machine tests/kernels/test_triton_lora_linear.py runs the same kinds of checks on CUDA tensors.
needs_interpreter = pytest.mark.skipif(not triton_interpreting(),
                                       reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make(rows, K, N, n, r, dtype, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    A = (torch.randn(n, r, K, generator=g) / K ** 0.5).to(dtype)
    B = (torch.randn(n, N, r, generator=g) / r ** 0.5).to(dtype)
    return x, w, b, A, B


def ref_forward_backward(x, w, b, A, B, scaling, layout, dy):
    xd = x.double().requires_grad_(True)
    Ad = A.double().requires_grad_(True)
    Bd = B.double().requires_grad_(True)
    y = reference.lora_linear(xd, w.double(), None if b is None else b.double(), Ad, Bd, scaling, layout)
    y.backward(dy.double())
    return y.detach(), xd.grad, Ad.grad, Bd.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [(0,), (-1, 0), (1, -1, 0), (0, 1)])
def test_forward_backward_matches_reference(backend, dtype, layout):
    rows_per_stream, K, N, n, r = 7, 37, 45, 2, 5          # odd shapes: no multiple of any block size
    S = len(layout)
    x, w, b, A, B = make(rows_per_stream * S, K, N, n, r, dtype)
    scaling = [1.7, 0.6]
    dy = torch.randn(rows_per_stream * S, N).to(dtype)
    y_ref, dx_ref, dA_ref, dB_ref = ref_forward_backward(x, w, b, A, B, scaling, layout, dy)

    xg, Ag, Bg = x.clone().requires_grad_(True), A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    y = ops.lora_linear(xg, w, b, Ag, Bg, scaling, layout, backend=backend)
    assert y.dtype == dtype and y.shape == y_ref.shape
    y.backward(dy)
    assert_rel_close(y, y_ref, dtype, "y")
    assert_rel_close(xg.grad, dx_ref, dtype, "dx")
    used = sorted({a for a in layout if a >= 0})
    for a in range(n):
        if a in used:
            assert_rel_close(Ag.grad[a], dA_ref[a], dtype, f"dA[{a}]")
            assert_rel_close(Bg.grad[a], dB_ref[a], dtype, f"dB[{a}]")
        else:
            assert torch.count_nonzero(Ag.grad[a]) == 0 and torch.count_nonzero(Bg.grad[a]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunk_rows", [1, 3, 7])
def test_torch_backend_row_chunks_match_reference(monkeypatch, dtype, chunk_rows):
    """The torch loop upcasts a chunk of rows at a time; chunks that split streams unevenly (7 rows in chunks
    of 3: 3, 3, 1) give the reference's forward and gradients, fp32 master adapters included."""
    rows_per_stream, K, N, n, r = 7, 37, 45, 2, 5
    monkeypatch.setattr(ll_mod, "CHUNK_ELEMENTS", chunk_rows * max(K, N))
    layout = (1, -1, 0)
    x, w, b, A, B = make(rows_per_stream * 3, K, N, n, r, dtype)
    adapters = (A.float(), B.float())                    # fp32 masters (the same tensors at fp32)
    dy = torch.randn(rows_per_stream * 3, N).to(dtype)
    y_ref, dx_ref, dA_ref, dB_ref = ref_forward_backward(x, w, b, A, B, [1.7, 0.6], layout, dy)
    xg = x.clone().requires_grad_(True)
    Ag, Bg = (t.clone().requires_grad_(True) for t in adapters)
    y = ops.lora_linear(xg, w, b, Ag, Bg, [1.7, 0.6], layout, backend="torch")
    y.backward(dy)
    assert_rel_close(y, y_ref, dtype, "y")
    assert_rel_close(xg.grad, dx_ref, dtype, "dx")
    for a in range(n):
        assert_rel_close(Ag.grad[a], dA_ref[a], torch.float32, f"dA[{a}]")
        assert_rel_close(Bg.grad[a], dB_ref[a], torch.float32, f"dB[{a}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_master_adapters_of_a_16bit_layer(backend, dtype):
    """fp32 adapters enter the kernels rounded to x's dtype (the forward equals that of 16-bit adapters bit for
    bit) and get fp32 gradients, as accurate as fp32 accumulation allows, not rounded to 16 bits."""
    rows_per_stream, K, N, n, r = 7, 37, 45, 2, 5
    layout = (1, -1, 0)
    x, w, b, _, _ = make(rows_per_stream * 3, K, N, n, r, dtype)
    g = torch.Generator().manual_seed(5)
    A32 = torch.randn(n, r, K, generator=g) / K ** 0.5
    B32 = torch.randn(n, N, r, generator=g) / r ** 0.5
    dy = torch.randn(rows_per_stream * 3, N, generator=g).to(dtype)
    A16, B16 = A32.to(dtype), B32.to(dtype)
    y16 = ops.lora_linear(x, w, b, A16, B16, [1.7, 0.6], layout, backend=backend)
    Ag, Bg = A32.clone().requires_grad_(True), B32.clone().requires_grad_(True)
    y = ops.lora_linear(x, w, b, Ag, Bg, [1.7, 0.6], layout, backend=backend)
    assert torch.equal(y, y16)
    y.backward(dy)
    assert Ag.grad.dtype == Bg.grad.dtype == torch.float32
    _, _, dA_ref, dB_ref = ref_forward_backward(x, w, b, A16, B16, [1.7, 0.6], layout, dy)
    for a in range(n):
        assert_rel_close(Ag.grad[a], dA_ref[a], torch.float32, f"dA[{a}]")
        assert_rel_close(Bg.grad[a], dB_ref[a], torch.float32, f"dB[{a}]")
    with pytest.raises(ValueError, match="lora_B: dtype"):
        ops.lora_linear(x, w, b, A32, B16, 1.0, layout, backend=backend)
    with pytest.raises(ValueError, match="lora_A: dtype"):      # fp32 masters only for a 16-bit layer
        ops.lora_linear(x.double(), w.double(), b.double(), A32, B32, 1.0, layout, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [1, 16, 33])
def test_ranks_leading_dims_no_bias(backend, r):
    x, w, _, A, B = make(2 * 3 * 5, 29, 19, 1, r, torch.float32, bias=False, seed=r)
    x3 = x.reshape(2, 15, 29)   # leading dims are flattened; 30 rows -> 2 streams of 15
    y = ops.lora_linear(x3, w, None, A, B, 0.5, (-1, 0), backend=backend)
    ref = reference.lora_linear(x3.double(), w.double(), None, A.double(), B.double(), [0.5], (-1, 0))
    assert y.shape == (2, 15, 19)
    assert_rel_close(y, ref, torch.float32, "y")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_B_adapter_stream_is_bitwise_base(backend, dtype):
    """With lora_B = 0 an adapter stream returns exactly the base stream's output (KL 0, ratio 1 at init)."""
    x, w, b, A, B = make(11, 53, 41, 2, 8, dtype)
    B.zero_()
    xs = x.repeat(3, 1)
    y = ops.lora_linear(xs, w, b, A, B, 2.0, (-1, 0, 1), backend=backend)
    assert torch.equal(y[:11], y[11:22]) and torch.equal(y[:11], y[22:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_only_x_requires_grad(backend):
    x, w, b, A, B = make(8, 17, 13, 1, 4, torch.float32)
    xg = x.clone().requires_grad_(True)
    ops.lora_linear(xg, w, b, A, B, 1.0, (0, -1), backend=backend).sum().backward()
    _, dx_ref, _, _ = ref_forward_backward(x, w, b, A, B, [1.0], (0, -1), torch.ones(8, 13))
    assert_rel_close(xg.grad, dx_ref, torch.float32, "dx")


def test_bad_input_names_the_argument():
    x, w, b, A, B = make(6, 8, 5, 2, 3, torch.float32)
    cases = [
        (dict(x=torch.randn(6, 9)), "x"),
        (dict(stream_adapters=(0, 1, -1, 0)), "stream_adapters"),        # 6 rows into 4 streams
        (dict(stream_adapters=(0, 2)), "stream_adapters"),               # adapter index out of range
        (dict(stream_adapters=(-2,)), "stream_adapters"),
        (dict(A=A.double()), "lora_A"),                                  # mixed dtypes
        (dict(w=w.half()), "weight"),
        (dict(b=torch.randn(4)), "bias"),
        (dict(B=torch.randn(2, 5, 4)), "lora_B"),
        (dict(scaling=[1.0, 2.0, 3.0]), "scaling"),
        (dict(backend="cuda"), "backend"),
        (dict(backend="fast"), "backend"),
    ]
    for change, name in cases:
        args = dict(x=x, w=w, b=b, A=A, B=B, scaling=1.0, stream_adapters=(0, 1), backend="torch") | change
        with pytest.raises(ValueError, match=rf"^{name}:"):
            ops.lora_linear(args["x"], args["w"], args["b"], args["A"], args["B"], args["scaling"],
                            args["stream_adapters"], backend=args["backend"])


def test_frozen_weight_is_enforced():
    x, w, b, A, B = make(4, 8, 5, 1, 2, torch.float32)
    with pytest.raises(ValueError, match="^weight:"):
        ops.lora_linear(x, w.requires_grad_(True), b, A, B, 1.0, (0,))


def test_mixed_devices_rejected():
    x, w, b, A, B = make(4, 8, 5, 1, 2, torch.float32)
    with pytest.raises(ValueError, match="^weight:"):
        ops.lora_linear(x, w.to("meta"), b, A, B, 1.0, (0,))


def test_torch_compile_fullgraph_matches_eager():
    x, w, b, A, B = make(10, 16, 12, 2, 4, torch.float32)
    f = lambda x: ops.lora_linear(x, w, b, A, B, [0.5, 1.5], (-1, 1), backend="torch")   # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


# --- scaling and stream_adapters are numbers; bad ones raise a ValueError naming the argument ---

def make_args(rows=4, K=7, N=5, n=2, r=2):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(rows, K, generator=g), torch.randn(N, K, generator=g), torch.randn(n, r, K, generator=g),
            torch.randn(n, N, r, generator=g))


@pytest.mark.parametrize("scaling", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 0.5,
                                     [np.float32(0.5), 0.5], np.array([0.5, 0.5], dtype=np.float32)])
def test_numeric_scaling_types(scaling):
    x, w, A, B = make_args()
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
    x, w, A, B = make_args()
    with pytest.raises(ValueError, match=rf"^{name}:"):
        ops.lora_linear(x, w, None, A, B, scaling, stream_adapters, backend="torch")


# --- a bias that is a strided view ---


def make_bias(rows, K, N, n, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    A = torch.randn(n, r, K, generator=g) / K ** 0.5
    B = torch.randn(n, N, r, generator=g) / r ** 0.5
    return x, w, A, B


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_bias(backend):
    """A bias that is a strided view (every other element of a buffer) is read with its stride, not as the
    buffer's elements 0..N-1."""
    x, w, A, B = make_bias(3 * 5, 19, 13, 2, 3)
    buf = torch.randn(2 * 13, generator=torch.Generator().manual_seed(9))
    bias = buf[::2]
    assert not bias.is_contiguous()
    layout = (1, -1, 0)
    ref = reference.lora_linear(x.double(), w.double(), bias.double(), A.double(), B.double(), [0.5, 2.0], layout)
    y = ops.lora_linear(x, w, bias, A, B, [0.5, 2.0], layout, backend=backend)
    assert_rel_close(y, ref, torch.float32, "y")


# --- the eager no-grad fast path (the op's forward called directly when nothing needs grad or compiles):
# what the registered op gives, bit for bit, with the same autograd flags; tracing tools still work ---


def make_fast(rows, K, N, n, r, dtype, adapter_dtype=None, seed=0):
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
    x, w, b, A, B = make_fast(2 * 7, 23, 17, 2, 4, dtype, adapter_dtype)
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
    record hydra_kernels::lora_linear: the no-grad fast path never launches a kernel on fake tensors or
    proxies."""
    x, w, b, A, B = make_fast(2 * 4, 16, 12, 1, 2, torch.float32)
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
    x, w, b, A, B = make_fast(2 * 4, 16, 12, 1, 2, torch.float32)
    with FakeTensorMode(allow_non_fake_inputs=True):
        with torch.no_grad():
            y = ops.lora_linear(x, w, b, A, B, 1.0, (0, -1), backend=backend)
    assert isinstance(y, FakeTensor) and y.shape == (8, 12) and y.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tracing_mode", ["real", "fake", "symbolic"])
def test_make_fx_records_the_custom_op_in_every_tracing_mode(backend, tracing_mode):
    x, w, b, A, B = make_fast(2 * 4, 16, 12, 1, 2, torch.float32)
    f = lambda x, w, b, A, B: ops.lora_linear(x, w, b, A, B, 1.0, (0, -1), backend=backend)   # noqa: E731
    gm = make_fx(f, tracing_mode=tracing_mode)(x, w, b, A, B)
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "hydra_kernels.lora_linear.default" in targets, targets
    torch.testing.assert_close(gm(x, w, b, A, B), f(x, w, b, A, B), rtol=0, atol=0)
