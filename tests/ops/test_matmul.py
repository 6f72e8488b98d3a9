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


def _meta_mm_out_dtype_has_no_derivative() -> bool:
    a = torch.ones(2, 3, dtype=torch.bfloat16, device="meta", requires_grad=True)
    try:
        out = torch.mm(a, torch.ones(3, 2, dtype=torch.bfloat16, device="meta"), out_dtype=torch.float32)
        out.sum().backward()
    except (TypeError, NotImplementedError):
        return False                            # no out_dtype at all: mm_f32 never takes that path
    except RuntimeError as e:
        return "not implemented" in str(e)
    return False


def test_cpu_backward_is_the_fp32_formulas():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 33, generator=g).to(torch.bfloat16).requires_grad_(True)
    w = torch.randn(37, 33, generator=g).to(torch.bfloat16).requires_grad_(True)
    up = torch.randn(2, 5, 37, generator=g)
    (linear_f32(x, w) * up).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    (F.linear(x2.float(), w2.float()) * up).sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(w.grad, w2.grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_cuda_backward_works(dtype):
    """HydraModel.lm_logits under grad on a 16-bit GPU model: torch.mm(out_dtype=float32) records a node whose
    backward raises (checked on the meta device: autograd is the same for every device), so mm_f32 must not use it
    when autograd records the product."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 64, generator=g).to(dtype).cuda().requires_grad_(True)
    w = torch.randn(100, 64, generator=g).to(dtype).cuda().requires_grad_(True)
    up = torch.randn(6, 100, generator=g).cuda()
    out = linear_f32(x, w)
    assert out.dtype == torch.float32
    (out * up).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    (F.linear(x2.float(), w2.float()) * up).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    with torch.no_grad():                                   # without grad the copy-free path is still taken
        torch.testing.assert_close(linear_f32(x, w), out.detach())


def test_why_mm_f32_avoids_out_dtype_under_grad():
    """The premise of test_cuda_backward_works, checkable without a GPU (skipped where torch has no out_dtype)."""
    if not hasattr(torch.ops.aten.mm, "dtype"):
        pytest.skip("this torch has no torch.mm(out_dtype=...)")
    assert _meta_mm_out_dtype_has_no_derivative()
