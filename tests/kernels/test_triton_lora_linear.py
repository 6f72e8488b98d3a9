"""Kernel-level tests of hydra_kernels.kernels.triton.lora_linear (interpreter on CPU, compiled on GPU).

Shapes are chosen against the interpreter's fixed config (BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, N_GROUP=2,
GROUP_M=2; wgrad BLOCK_BIG=32, BLOCK_ROWS=16): streams that end mid-tile, a last column group with a
column tile past N, K not a multiple of BLOCK_K, and dA/dB row chunks. On a GPU machine the same tests run
compiled, on CUDA tensors, with that same fixed config (HYDRA_KERNELS_TRITON_AUTOTUNE=0: no autotuning of
tiny shapes); the tests marked gpu use the autotuned configs at benchmark-like shapes.
"""
import pytest
import torch

from hydra_kernels import ops, reference
from hydra_kernels.kernels.triton import lora_linear as tk
from tests._util import assert_rel_close, poison_

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = "cuda" if torch.cuda.is_available() else "cpu"      # cpu: conftest has turned the interpreter on


@pytest.fixture(autouse=True)
def _fixed_config_for_small_shapes(request, monkeypatch):
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv(tk.AUTOTUNE_ENV, "0")


def make(rows, K, N, n, r, dtype, bias=True, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    A = (torch.randn(n, r, K, generator=g) / K ** 0.5).to(dtype)
    B = (torch.randn(n, N, r, generator=g) / r ** 0.5).to(dtype)
    to = lambda t: None if t is None else t.to(device)   # noqa: E731
    return to(x), to(w), to(b), to(A), to(B)


def reference_all(x, w, b, A, B, scaling, layout, dy):
    """float64 y, dx, dA, dB and the shrink x·A[a]ᵀ per row (NaN on base rows)."""
    xd, Ad, Bd = (t.double().requires_grad_(True) for t in (x, A, B))
    y = reference.lora_linear(xd, w.double(), None if b is None else b.double(), Ad, Bd, scaling, layout)
    y.backward(dy.double())
    S, rows = len(layout), x.shape[0]
    xa = torch.full((rows, A.shape[1]), float("nan"), dtype=torch.float64, device=x.device)
    for s, sl in enumerate(reference.split_streams(rows, S)):
        if layout[s] >= 0:
            xa[sl] = x[sl].double() @ A[layout[s]].double().T
    return y.detach(), xd.grad, Ad.grad, Bd.grad, xa


def check_all(x, w, b, A, B, scaling, layout, dtype, factor=1.0, need_dx=True):
    rows, N = x.shape[0], w.shape[0]
    dy = torch.randn(rows, N).to(device=x.device, dtype=dtype)
    y_ref, dx_ref, dA_ref, dB_ref, xa_ref = reference_all(x, w, b, A, B, scaling, layout, dy)
    y, xa = tk.lora_linear_forward(x, w, b, A, B, scaling, list(layout))
    assert y.dtype == dtype and xa.dtype == torch.float32
    assert_rel_close(y, y_ref, dtype, "y", factor)
    lora_rows = ~torch.isnan(xa_ref[:, 0])
    if lora_rows.any():
        assert_rel_close(xa[lora_rows], xa_ref[lora_rows], dtype, "xa", factor)
    dx, dA, dB = tk.lora_linear_backward(dy, x, w, A, B, xa, scaling, list(layout), need_dx)
    if need_dx:
        assert_rel_close(dx, dx_ref, dtype, "dx", factor)
    else:
        assert dx is None
    assert dA.dtype == dtype and dB.dtype == dtype
    for a in range(A.shape[0]):
        if a in layout:
            assert_rel_close(dA[a], dA_ref[a], dtype, f"dA[{a}]", factor)
            assert_rel_close(dB[a], dB_ref[a], dtype, f"dB[{a}]", factor)
        else:
            assert torch.count_nonzero(dA[a]) == 0 and torch.count_nonzero(dB[a]) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_streams_ending_mid_tile(dtype):
    """19 rows per stream: each stream's second m-tile is partial (BLOCK_M=16); K=70 has a partial K step;
    N=80 makes the second column group hold one partial tile and one tile past N; 2 row chunks in dA/dB."""
    layout = (0, -1, 1)
    x, w, b, A, B = make(19 * 3, 70, 80, 2, 6, dtype, seed=1)
    check_all(x, w, b, A, B, [1.5, 0.75], layout, dtype)


def test_forward_writes_every_output_element():
    """Call the launcher on NaN-poisoned outputs: every y element and every adapter row of xa gets written."""
    layout = (1, -1, 0)
    x, w, b, A, B = make(21 * 3, 40, 70, 2, 5, torch.float32, seed=2)
    adapters, scales, _, _ = tk._stream_meta(layout, (0.5, 2.0), x.device)
    y = poison_(torch.empty(x.shape[0], w.shape[0], device=DEV))
    xa = poison_(torch.empty(x.shape[0], A.shape[1], device=DEV))
    tk._launch_gemm(x, (w, w.stride(0), w.stride(1)), b, (A, *A.stride()), (B, *B.stride()), y, xa,
                    adapters, scales, 21, 3, w.shape[0], w.shape[1], A.shape[1], compute_y=True)
    assert not torch.isnan(y).any()
    assert not torch.isnan(xa[:21]).any() and not torch.isnan(xa[42:]).any()
    ref = reference.lora_linear(x.double(), w.double(), b.double(), A.double(), B.double(), [0.5, 2.0], layout)
    assert_rel_close(y, ref, torch.float32, "y")


@pytest.mark.parametrize("r", [256, 130])
def test_rank_up_to_256(r):
    """R_PAD = 256 (130 pads to 256 with masked columns)."""
    x, w, b, A, B = make(5 * 2, 24, 20, 2, r, torch.float32, seed=r)
    check_all(x, w, b, A, B, [0.25, 0.5], (1, 0), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_row_per_stream(dtype):
    x, w, b, A, B = make(3, 33, 17, 2, 4, dtype, seed=3)
    check_all(x, w, b, A, B, [2.0, 0.5], (-1, 0, 1), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_B_bitwise_across_partial_tiles(dtype):
    """Exactness where streams end mid-tile and columns span two N_GROUP groups (first-tile shrink + reuse)."""
    x, w, b, A, B = make(19, 45, 100, 2, 8, dtype, seed=4)
    B.zero_()
    y, _ = tk.lora_linear_forward(x.repeat(3, 1), w, b, A, B, [3.0, 0.5], [0, -1, 1])
    assert torch.equal(y[:19], y[19:38]) and torch.equal(y[:19], y[38:])


def test_wgrad_row_chunks_including_an_empty_one():
    """70 rows per stream, 2 adapter streams: the interpreter's chunking gives 4 chunks of 32 rows, the last
    one empty (it must contribute zeros, not garbage)."""
    x, w, b, A, B = make(70 * 2, 24, 20, 2, 3, torch.float32, seed=11)
    check_all(x, w, b, A, B, [0.5, 1.5], (0, 1), torch.float32)


def test_shared_adapter_and_shrink_only_backward():
    """Two streams using adapter 0 sum into one dA/dB; need_dx=False runs the shrink-only mode for dY·B."""
    x, w, b, A, B = make(9 * 3, 50, 36, 2, 7, torch.float32, seed=5)
    check_all(x, w, b, A, B, [1.25, 0.5], (0, -1, 0), torch.float32, need_dx=False)
    check_all(x, w, b, A, B, [1.25, 0.5], (0, -1, 0), torch.float32, need_dx=True)


def test_no_adapters_and_base_only():
    x, w, b, _, _ = make(12, 20, 18, 1, 2, torch.float32, seed=6)
    y = ops.lora_linear(x, w, b, backend="triton")
    assert_rel_close(y, x.double() @ w.double().T + b.double(), torch.float32, "y")
    x2, w2, b2, A2, B2 = make(8, 20, 18, 2, 3, torch.float32, seed=7)
    dy = torch.randn(8, 18).to(DEV)
    dx, dA, dB = tk.lora_linear_backward(dy, x2, w2, A2, B2, torch.zeros(8, 3, device=DEV), [1.0, 1.0], [-1, -1],
                                         True)
    assert_rel_close(dx, dy.double() @ w2.double(), torch.float32, "dx")
    assert torch.count_nonzero(dA) == 0 and torch.count_nonzero(dB) == 0


def test_rejects_float64_and_big_rank():
    x, w, b, A, B = make(4, 8, 6, 1, 2, torch.float64)
    with pytest.raises(ValueError, match="^x:"):
        ops.lora_linear(x, w, b, A, B, 1.0, (0,), backend="triton")
    x, w, b, A, B = make(2, 8, 6, 1, 257, torch.float32)
    with pytest.raises(ValueError, match="^lora_A:"):
        tk.lora_linear_forward(x, w, b, A, B, [1.0], [0])


def test_ops_triton_autograd_with_leading_dims_and_fp16():
    x, w, b, A, B = make(2 * 17, 24, 40, 2, 4, torch.float16, seed=8)
    x3 = x.reshape(2, 17, 24).clone().requires_grad_(True)
    Ag, Bg = A.clone().requires_grad_(True), B.clone().requires_grad_(True)
    y = ops.lora_linear(x3, w, b, Ag, Bg, [0.5, 1.5], (1, 0), backend="triton")
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref, dx_ref, dA_ref, dB_ref, _ = reference_all(x, w, b, A, B, [0.5, 1.5], (1, 0), dy.reshape(34, 40))
    assert_rel_close(y.reshape(34, 40), y_ref, torch.float16, "y")
    assert_rel_close(x3.grad.reshape(34, 24), dx_ref, torch.float16, "dx")
    assert_rel_close(Ag.grad, dA_ref, torch.float16, "dA")
    assert_rel_close(Bg.grad, dB_ref, torch.float16, "dB")


# ---------------------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("K,N", [(4096, 4096), (4096, 11008)])
@pytest.mark.parametrize("r", [16, 64, 128])
def test_gpu_bench_shapes_bf16(K, N, r):
    """Benchmark-ish shapes through the autotuned kernels, bf16 vs float64: fwd+bwd for 3 streams."""
    torch.manual_seed(r)
    rps, layout = 256, (-1, 0, 1)
    x, w, b, A, B = make(rps * 3, K, N, 2, r, torch.bfloat16, device="cuda", seed=r)
    check_all(x, w, b, A, B, [2.0, 0.5], layout, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("rps", [1, 16, 64, 100, 2048])
def test_gpu_zero_B_bitwise_every_row_class(rps):
    """The exactness property under each autotuned row class (small/mid/large configs)."""
    x, w, b, A, B = make(rps, 4096, 4096, 2, 64, torch.bfloat16, device="cuda", seed=rps)
    B.zero_()
    y, _ = tk.lora_linear_forward(x.repeat(3, 1), w, b, A, B, [2.0, 2.0], [-1, 0, 1])
    assert torch.equal(y[:rps], y[rps:2 * rps]) and torch.equal(y[:rps], y[2 * rps:])


@pytest.mark.gpu
def test_gpu_many_rows_and_more_than_65535_programs():
    """≥ 65536 rows through the autotuned op, then the raw kernel with a tiny forced config so the 1-D grid
    exceeds 65535 programs."""
    rps, K, N, r = 65536, 32, 512, 16
    x, w, b, A, B = make(rps * 2, K, N, 1, r, torch.bfloat16, device="cuda", seed=9)
    ref = reference.lora_linear(x.double(), w.double(), b.double(), A.double(), B.double(), [2.0], (0, -1))
    y = ops.lora_linear(x, w, b, A, B, 2.0, (0, -1), backend="triton")
    assert_rel_close(y, ref, torch.bfloat16, "y")

    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=8, N_GROUP=1)
    programs = 2 * triton_cdiv(rps, 16) * triton_cdiv(N, 32)
    assert programs > 65535
    adapters, scales, _, _ = tk._stream_meta((0, -1), (2.0,), x.device)
    y2 = poison_(torch.empty_like(y))
    xa = torch.empty(rps * 2, r, device="cuda")
    tk._lora_gemm_kernel[(programs,)](
        x, w, b, A, B, y2, xa, adapters, scales, rps, N, K, r, 2,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), *A.stride(), *B.stride(),
        y2.stride(0), y2.stride(1), xa.stride(0), 4096,
        HAS_BIAS=True, COMPUTE_Y=True, UPCAST=False, DOT_PREC="tf32", EPI_PREC="tf32", R_PAD=16, **cfg)
    assert_rel_close(y2, ref, torch.bfloat16, "y (forced tiny tiles)")


@pytest.mark.gpu
def test_gpu_actor_fwd_bwd_large_rows():
    """1 stream fwd+bwd at 2048 rows, the training case of the benchmark."""
    x, w, b, A, B = make(2048, 4096, 4096, 1, 64, torch.bfloat16, device="cuda", seed=10)
    check_all(x, w, b, A, B, [2.0], (0,), torch.bfloat16)


def triton_cdiv(a, b):
    return -(-a // b)
