// Per-token log-probs, KL and entropy from materialized logits: forward and backward (to the actor logits).
//
// Contract: the one at the top of hydra_kernels/kernels/triton/logprobs.py (same outputs, same stats layout
// (m, log_s, m_ref, log_s_ref), same backward formula), so the `cuda` and `triton` backends are interchangeable.
//
// Design (memory-bound: one read of the logits row, one per model, and one write of dlogits in the backward):
//  * One thread block per row; rows on gridDim.x only, and blocks loop over rows beyond the grid, so any number
//    of tokens works.
//  * 16-byte loads (8 bf16/fp16 or 4 fp32 per load), two in flight per thread. A row may start anywhere (odd V,
//    `logits[:, :-1]` slices): the few elements before the first 16-byte boundary and after the last full vector
//    are done as scalars. Where two rows that are read together (actor/reference, logits/dlogits) are not
//    equally aligned, the row falls back to coalesced scalar accesses.
//  * Online max/sum in fp32, per thread over chunks of 2 vectors (one max per chunk, a rescale only when the
//    running max moves), then warp shuffles and one shared-memory step across warps (a fixed tree:
//    deterministic). Entropy and the full KL are accumulated in max-shifted form (sum e^(z-m)(z-m),
//    sum e^(z-m)((z-m)-(z_ref-m_ref))) and rescaled with the sums, as in the Triton kernel, so no term loses
//    digits against a large logit.
//  * Nothing reads past the end of a row: columns >= V are never loaded, so there is nothing to mask ("phantom
//    tokens" cannot happen); logits that are -inf contribute exp(-inf) = 0, and 0·log 0 = 0 is enforced.
//  * One exp per element per model, on the special-function unit (ex2.approx, the instruction expf and tl.exp
//    use): ~2^-22 relative error per term. Logs, the rare rescale exps and the per-row formulas use the
//    accurate logf/expf. No --use_fast_math anywhere.
// The per-thread row work and the per-row formulas live in logprobs_row.cuh (host + device, tested on the CPU).
#include <cuda_runtime.h>
#include <stdint.h>

#include "hydra_kernels.h"
#include "logprobs_row.cuh"

namespace hydra {
namespace {

using lp::State;

constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

template <bool ENT, bool REF, bool FULL>
__device__ __forceinline__ State shfl_xor(const State& s, int offset) {
  State o = lp::empty_state();
  o.m = __shfl_xor_sync(0xffffffffu, s.m, offset);
  o.s = __shfl_xor_sync(0xffffffffu, s.s, offset);
  if (ENT) o.a = __shfl_xor_sync(0xffffffffu, s.a, offset);
  if (REF) {
    o.mr = __shfl_xor_sync(0xffffffffu, s.mr, offset);
    o.sr = __shfl_xor_sync(0xffffffffu, s.sr, offset);
  }
  if (FULL) o.c = __shfl_xor_sync(0xffffffffu, s.c, offset);
  return o;
}

// Butterfly within each warp, then warp 0 over the per-warp states. The result is valid in thread 0.
template <bool ENT, bool REF, bool FULL>
__device__ __forceinline__ State block_reduce(State s, State* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s = lp::merge<ENT, REF, FULL>(s, shfl_xor<ENT, REF, FULL>(s, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < static_cast<int>(blockDim.x >> 5) ? smem[lane] : lp::empty_state();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s = lp::merge<ENT, REF, FULL>(s, shfl_xor<ENT, REF, FULL>(s, off));
  }
  return s;
}

// ---------------------------------------------------------------------------------------------- forward
template <typename T, bool REF, bool FULL>
__global__ void __launch_bounds__(kMaxThreads) logprobs_fwd_kernel(const LogprobsFwdArgs args) {
  constexpr bool ENT = REF;   // entropy is an output of logprobs_and_kl only (not of token_logprobs)
  __shared__ State red[kMaxWarps];
  const T* X = static_cast<const T*>(args.logits);
  const T* RX = static_cast<const T*>(args.ref_logits);
  const int64_t rows = args.B * args.T, V = args.V;
  const float inv_t = args.inv_temperature;
  const int tid = threadIdx.x;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t bi = row / args.T, ti = row - bi * args.T;
    const T* x = X + bi * args.sx_b + ti * args.sx_t;
    const T* r = REF ? RX + bi * args.sr_b + ti * args.sr_t : nullptr;
    const int64_t tgt = args.targets[row];
    if (tgt == args.ignore_index) {       // block-uniform: ignored rows cost no bandwidth
      if (tid == 0) {
        args.logp[row] = 0.f;
        if (REF) {
          args.ref_logp[row] = 0.f;
          args.kl[row] = 0.f;
          args.entropy[row] = 0.f;
        }
        reinterpret_cast<float4*>(args.stats)[row] = make_float4(0.f, 0.f, 0.f, 0.f);
      }
      continue;
    }
    const bool in_range = tgt >= 0 && tgt < V;   // a bad target gives NaN, never an out-of-bounds read
    float zt = 0.f, zrt = 0.f;
    if (tid == 0 && in_range) {                  // issued first so its latency hides behind the row
      zt = lp::Elem<T>::load1(x + tgt) * inv_t;
      if (REF) zrt = lp::Elem<T>::load1(r + tgt) * inv_t;
    }
    State s = lp::thread_row_forward<T, ENT, REF, FULL>(x, r, V, inv_t, tid, blockDim.x);
    s = block_reduce<ENT, REF, FULL>(s, red);
    if (tid == 0) {
      float out[4], st[4];
      lp::finalize_row<REF, FULL>(s, zt, zrt, in_range, args.kl_mode, out, st);
      args.logp[row] = out[0];
      if (REF) {
        args.ref_logp[row] = out[1];
        args.kl[row] = out[2];
        args.entropy[row] = out[3];
      }
      reinterpret_cast<float4*>(args.stats)[row] = make_float4(st[0], st[1], st[2], st[3]);
    }
    __syncthreads();   // `red` is reused by the next row
  }
}

// --------------------------------------------------------------------------------------------- backward
template <typename T, bool NEED_REF>
__global__ void __launch_bounds__(kMaxThreads) logprobs_bwd_kernel(const LogprobsBwdArgs args) {
  const T* X = static_cast<const T*>(args.logits);
  const T* RX = static_cast<const T*>(args.ref_logits);
  T* DX = static_cast<T*>(args.dlogits);
  const int64_t rows = args.B * args.T, V = args.V;
  const int tid = threadIdx.x, bs = blockDim.x;
  const bool has_gkl = args.grad_kl != nullptr;
  const bool sampled = has_gkl && args.kl_mode >= kKlK1 && args.kl_mode <= kKlK3;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t bi = row / args.T, ti = row - bi * args.T;
    const T* x = X + bi * args.sx_b + ti * args.sx_t;
    const T* r = NEED_REF ? RX + bi * args.sr_b + ti * args.sr_t : nullptr;
    T* dx = DX + row * V;
    const int64_t tgt = args.targets[row];
    if (tgt == args.ignore_index) {          // all four outputs are constant 0 there: the gradient is 0
      lp::thread_zero_row(dx, V, tid, bs);
      continue;
    }
    // Per-row scalars (the same few floats for every thread; served by L1).
    const float4 sv = reinterpret_cast<const float4*>(args.stats)[row];
    const float stats[4] = {sv.x, sv.y, sv.z, sv.w};
    const bool has_gent = args.grad_entropy != nullptr;
    const lp::BwdRow c = lp::make_bwd_row(
        stats, args.inv_temperature, args.kl_mode, has_gkl, args.grad_logp != nullptr ? args.grad_logp[row] : 0.f,
        has_gkl ? args.grad_kl[row] : 0.f, has_gent ? args.grad_entropy[row] : 0.f,
        sampled ? args.logp[row] : 0.f, sampled ? args.ref_logp[row] : 0.f, NEED_REF ? args.kl[row] : 0.f,
        has_gent ? args.entropy[row] : 0.f);
    lp::thread_row_backward<T, NEED_REF>(x, r, dx, V, tgt, c, tid, bs);
  }
}

// --------------------------------------------------------------------------------------------- launchers
bool bad_launch_shape(int threads, int max_blocks) {
  return threads < 32 || threads > kMaxThreads || threads % 32 != 0 || max_blocks < 1;
}

template <typename T>
cudaError_t launch_forward(const LogprobsFwdArgs& a, cudaStream_t stream) {
  const int64_t rows = a.B * a.T;
  const unsigned grid = static_cast<unsigned>(rows < a.max_blocks ? rows : a.max_blocks);
  if (a.kl_mode == kKlNone) {
    logprobs_fwd_kernel<T, false, false><<<grid, a.threads, 0, stream>>>(a);
  } else if (a.kl_mode == kKlFull) {
    logprobs_fwd_kernel<T, true, true><<<grid, a.threads, 0, stream>>>(a);
  } else {
    logprobs_fwd_kernel<T, true, false><<<grid, a.threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const LogprobsBwdArgs& a, cudaStream_t stream) {
  const int64_t rows = a.B * a.T;
  const unsigned grid = static_cast<unsigned>(rows < a.max_blocks ? rows : a.max_blocks);
  if (a.kl_mode == kKlFull && a.grad_kl != nullptr) {
    logprobs_bwd_kernel<T, true><<<grid, a.threads, 0, stream>>>(a);
  } else {
    logprobs_bwd_kernel<T, false><<<grid, a.threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t logprobs_forward(const LogprobsFwdArgs& a, cudaStream_t stream) {
  if (bad_launch_shape(a.threads, a.max_blocks) || a.kl_mode < kKlNone || a.kl_mode > kKlFull) {
    return cudaErrorInvalidValue;
  }
  if ((a.kl_mode == kKlNone) != (a.ref_logits == nullptr)) return cudaErrorInvalidValue;
  if (a.B * a.T == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat32: return launch_forward<float>(a, stream);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return launch_forward<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t logprobs_backward(const LogprobsBwdArgs& a, cudaStream_t stream) {
  if (bad_launch_shape(a.threads, a.max_blocks) || a.kl_mode < kKlNone || a.kl_mode > kKlFull) {
    return cudaErrorInvalidValue;
  }
  if (a.kl_mode == kKlFull && a.grad_kl != nullptr && a.ref_logits == nullptr) return cudaErrorInvalidValue;
  if (a.B * a.T == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::kFloat32: return launch_backward<float>(a, stream);
    case DType::kBFloat16: return launch_backward<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return launch_backward<__half>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace hydra
