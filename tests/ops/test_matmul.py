"""mm_f32 / linear_f32: fp32 results from 16-bit operands, without an fp32 copy of the weight on CUDA."""
import pytest
import torch
import torch.nn.functional as F

from hydra_kernels.ops.matmul import linear_f32, mm_f32


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_cpu_equals_the_fp32_formula_bitwise(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 33, generator=g).to(dtype)
    w = torch.randn(37, 33, generator=g).to(dtype)
    b = torch.randn(37, generator=g).to(dtype)
    out = linear_f32(x, w, b)
    assert out.dtype == torch.float32 and out.shape == (2, 5, 37)
    assert torch.equal(out, F.linear(x.float(), w.float(), b.float()))
    assert torch.equal(linear_f32(x, w), F.linear(x.float(), w.float()))
    assert torch.equal(mm_f32(x[0], w.T), x[0].float() @ w.float().T)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_cuda_fp32_result_without_a_weight_copy(dtype):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(7, 2048, generator=g).to(dtype).cuda()
    w = torch.randn(32003, 2048, generator=g).to(dtype).cuda()
    ref = h.double() @ w.double().T
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = mm_f32(h, w.T)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-3)
    try:
        torch.mm(h, w.T, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch has no torch.mm(out_dtype=float32) on CUDA ({e}); mm_f32 copies the weight")
    # The output (7 x 32003 fp32) plus cuBLAS workspace; an fp32 copy of w alone would be 262 MB.
    assert extra < w.numel() * 4 // 8, f"mm_f32 allocated {extra / 2**20:.1f} MiB"
