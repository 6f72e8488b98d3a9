// Runs the host-side launchers of csrc/*.cu against tests/kernels/cuda_host/fake_cudart.cpp (no GPU, no libcudart):
// each call prints "call <label> <cudaError_t>" after the "launch ..." lines of the kernels it launched. Used by
// tests/kernels/test_cuda_compile.py, which checks the calls succeed and the launches are the designed ones.
//
// The LoRA sequence is what one process meets in practice: several layer shapes and row counts, both 16-bit
// dtypes, two devices. Every main-kernel configuration needs its own shared-memory opt-in (> 48 KiB), set on
// each device.
#include <cstdio>

#include "hydra_kernels.h"

extern "C" void fake_cuda_set_device(int device);
extern "C" void fake_cuda_set_cc(int major, int smem_optin);

namespace {

void* fake_ptr(int i) { return reinterpret_cast<void*>(static_cast<uintptr_t>(0x100000) * (i + 1)); }

hydra::LoraSmallArgs lora(hydra::DType dtype, int R, int N, int K, int rank, int n_streams, const int* adapters,
                          int block_m_warps, int splits) {
  hydra::LoraSmallArgs a{};
  a.dtype = dtype;
  a.x = fake_ptr(0);
  a.weight = fake_ptr(1);
  a.lora_A = fake_ptr(2);
  a.lora_B = fake_ptr(3);
  a.y = fake_ptr(4);
  a.xa = static_cast<float*>(fake_ptr(5));
  a.workspace = splits > 1 ? static_cast<float*>(fake_ptr(6)) : nullptr;
  a.counters = splits > 1 ? static_cast<int*>(fake_ptr(7)) : nullptr;
  a.R = R;
  a.N = N;
  a.K = K;
  a.rank = rank;
  a.n_streams = n_streams;
  for (int s = 0; s < n_streams; ++s) {
    a.stream_adapter[s] = adapters[s];
    a.stream_scale[s] = adapters[s] >= 0 ? 1.f : 0.f;
  }
  a.block_m_warps = block_m_warps;
  a.splits = splits;
  return a;
}

void call(const char* label, cudaError_t rc) {
  std::printf("call %s %d\n", label, static_cast<int>(rc));
  std::fflush(stdout);
}

// The fields LogprobsFwdArgs and LogprobsBwdArgs share.
template <typename Args>
Args logprobs(hydra::DType dtype, int64_t B, int64_t T, int64_t V, int threads, int max_blocks) {
  Args a{};
  a.dtype = dtype;
  a.logits = fake_ptr(0);
  a.targets = static_cast<const int64_t*>(fake_ptr(1));
  a.B = B;
  a.T = T;
  a.V = V;
  a.inv_temperature = 1.f;
  a.threads = threads;
  a.max_blocks = max_blocks;
  return a;
}

struct LoraCase {
  const char* label;
  int device, cc_major, smem_optin;
  hydra::DType dtype;
  int R, N, K, rank, n_streams, adapters[3], block_m_warps, splits;
};

}  // namespace

int main() {
  using hydra::DType;
  const DType bf16 = DType::kBFloat16;
  const LoraCase cases[] = {
      // 128 rows (two streams, a rank-64 adapter) in 128-feature blocks: the largest configuration first ...
      {"lora_bf16_r128_mw2", 0, 9, 227 * 1024, bf16, 128, 4096, 4096, 64, 2, {-1, 0}, 2, 1},
      // ... then others that still need more than 48 KiB: other kernel instantiations, each needs its opt-in.
      {"lora_bf16_r64_mw1", 0, 9, 227 * 1024, bf16, 64, 4096, 4096, 0, 1, {-1}, 1, 1},
      {"lora_fp16_r128_mw2", 0, 9, 227 * 1024, DType::kFloat16, 128, 4096, 4096, 64, 2, {-1, 0}, 2, 1},
      {"lora_bf16_r128_mw1", 0, 9, 227 * 1024, bf16, 128, 4096, 4096, 64, 2, {-1, 0}, 1, 1},
      // split-K, three streams (base, adapter 0, adapter 1), 48 rows
      {"lora_bf16_splitk", 0, 9, 227 * 1024, bf16, 48, 1024, 4096, 16, 3, {-1, 0, 1}, 1, 8},
      // split-K without adapters: the shrink kernel only zeroes the split-K counters
      {"lora_bf16_splitk_base", 0, 9, 227 * 1024, bf16, 16, 1024, 4096, 0, 1, {-1}, 1, 4},
      // K = 64: one K tile, so 8 requested splits become 1 (no counters, no shrink, no PDL)
      {"lora_bf16_one_ktile", 0, 9, 227 * 1024, bf16, 16, 256, 64, 0, 1, {-1}, 1, 8},
      // A second device (sm_80: no PDL) meets configurations already used on device 0.
      {"lora_dev1_bf16_r64_mw1", 1, 8, 163 * 1024, bf16, 64, 4096, 4096, 0, 1, {-1}, 1, 1},
      {"lora_dev1_bf16_r128_mw1", 1, 8, 163 * 1024, bf16, 128, 4096, 4096, 64, 2, {-1, 0}, 1, 1},
  };
  for (const LoraCase& c : cases) {
    fake_cuda_set_cc(c.cc_major, c.smem_optin);
    fake_cuda_set_device(c.device);
    call(c.label, hydra::lora_small_forward(lora(c.dtype, c.R, c.N, c.K, c.rank, c.n_streams, c.adapters,
                                                 c.block_m_warps, c.splits), nullptr));
  }

  // Log-probs: rows beyond any grid axis limit loop inside the blocks (grid capped at max_blocks on x).
  fake_cuda_set_device(0);
  hydra::LogprobsFwdArgs f = logprobs<hydra::LogprobsFwdArgs>(DType::kBFloat16, 3, 1000000000, 151936, 256,
                                                              2147483647);
  f.kl_mode = hydra::kKlNone;
  f.logp = static_cast<float*>(fake_ptr(2));
  f.stats = static_cast<float*>(fake_ptr(3));
  call("logprobs_fwd_3e9_rows", hydra::logprobs_forward(f, nullptr));
  hydra::LogprobsBwdArgs b = logprobs<hydra::LogprobsBwdArgs>(DType::kFloat16, 2, 70000, 32001, 512, 65535);
  b.kl_mode = hydra::kKlK3;
  b.stats = static_cast<const float*>(fake_ptr(3));
  b.dlogits = fake_ptr(4);
  call("logprobs_bwd_140k_rows", hydra::logprobs_backward(b, nullptr));
  return 0;
}
