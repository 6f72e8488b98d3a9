// Host API of the pure CUDA C++ kernels in csrc/*.cu: raw pointers, sizes and a cudaStream_t.
//
// Nothing here includes torch: the .cu files compile with plain nvcc (tests/kernels/test_cuda_compile.py), and
// csrc/ops.cpp is the only file that knows about at::Tensor (it checks arguments and registers torch ops).
// Every launcher returns cudaSuccess or the error of the failed launch / attribute call; the caller turns it
// into an exception.
#pragma once

#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace hydra {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// ------------------------------------------------------------------------------------------------ log-probs
// The contract is the one documented at the top of hydra_kernels/kernels/triton/logprobs.py (the two backends
// are interchangeable, stats included). Rows r = b*T + t of logits [B, T, V] (stride(-1) == 1, any B/T strides).
enum KlMode : int { kKlNone = 0, kKlK1 = 1, kKlK2 = 2, kKlK3 = 3, kKlFull = 4 };

struct LogprobsFwdArgs {
  DType dtype;
  const void* logits;            // [B, T, V]
  const void* ref_logits;        // same layout rules, or nullptr when kl_mode == kKlNone
  const int64_t* targets;        // [B*T], contiguous
  int64_t B, T, V;
  int64_t sx_b, sx_t;            // logits strides of the B and T dims, in elements
  int64_t sr_b, sr_t;            // ref_logits strides
  float inv_temperature;         // 1 / temperature, rounded to fp32 once on the host
  int kl_mode;                   // KlMode
  int64_t ignore_index;
  float* logp;                   // [B*T]
  float* ref_logp;               // [B*T] or nullptr (kKlNone)
  float* kl;                     // [B*T] or nullptr (kKlNone)
  float* entropy;                // [B*T] or nullptr (kKlNone: token_logprobs computes no entropy)
  float* stats;                  // [B*T, 4]: (m, log_s, m_ref, log_s_ref)
  int threads;                   // block size: a multiple of 32 in [32, 512]
  int max_blocks;                // grid cap on axis 0; blocks loop over rows beyond it
};

struct LogprobsBwdArgs {
  DType dtype;
  const void* logits;
  const void* ref_logits;        // read only for kl_mode == kKlFull with grad_kl != nullptr
  const int64_t* targets;
  int64_t B, T, V;
  int64_t sx_b, sx_t, sr_b, sr_t;
  float inv_temperature;
  int kl_mode;
  int64_t ignore_index;
  const float* grad_logp;        // [B*T] or nullptr (= 0)
  const float* grad_kl;          // [B*T] or nullptr
  const float* grad_entropy;     // [B*T] or nullptr
  const float* logp;             // forward outputs
  const float* ref_logp;
  const float* kl;
  const float* entropy;
  const float* stats;
  void* dlogits;                 // [B*T, V] contiguous, logits' dtype; every element written
  int threads;
  int max_blocks;
};

cudaError_t logprobs_forward(const LogprobsFwdArgs& args, cudaStream_t stream);
cudaError_t logprobs_backward(const LogprobsBwdArgs& args, cudaStream_t stream);

// ------------------------------------------------------------------------------ small-batch multi-stream LoRA
// y = x·Wᵀ + b (+ scaling[a]·(x·A[a]ᵀ)·B[a]ᵀ on rows of streams whose adapter a >= 0); xa = x·A[a]ᵀ in fp32 for
// those rows (base rows of xa are left unwritten). bf16 / fp16 only (tensor cores); K % 8 == 0; all pointers
// 16-byte aligned; x [R, K], W [N, K], bias [N], A [n, r, K], B [n, N, r], y [R, N], xa [R, r], all contiguous.
constexpr int kLoraMaxStreams = 8;     // streams per call
constexpr int kLoraMaxRank = 128;      // LoRA rank r
constexpr int kLoraMaxRows = 128;      // R = streams * rows_per_stream handled in one pass over W

struct LoraSmallArgs {
  DType dtype;                   // kBFloat16 or kFloat16
  const void* x;
  const void* weight;
  const void* bias;              // or nullptr
  const void* lora_A;            // or nullptr when no stream uses an adapter
  const void* lora_B;
  void* y;
  float* xa;                     // [R, r]
  float* workspace;              // split-K partials, >= lora_small_workspace_floats(...) floats (splits > 1)
  int* counters;                 // >= lora_small_num_tiles(...) ints (splits > 1); zeroed by the launcher
  int R, N, K, rank;
  int n_streams;                 // R % n_streams == 0
  int stream_adapter[kLoraMaxStreams];   // -1 = base
  float stream_scale[kLoraMaxStreams];   // scaling of the stream's adapter
  int block_m_warps;             // 1 (64 output features per block) or 2 (128)
  int splits;                    // K splits (>= 1); 1 = the epilogue runs in the same block, no workspace
};

int lora_small_rows_per_block(int R);                       // 16, 32, 64 or 128 (0 if R is too large)
int lora_small_block_n(int block_m_warps);                  // output features per block
int lora_small_num_tiles(int N, int block_m_warps);
size_t lora_small_workspace_floats(int N, int R, int block_m_warps, int splits);
size_t lora_small_smem_bytes(int R, int rank, int n_used_adapters, int block_m_warps);
cudaError_t lora_small_forward(const LoraSmallArgs& args, cudaStream_t stream);

}  // namespace hydra
