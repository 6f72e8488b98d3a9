// Multi-stream LoRA linear, forward, for small row counts (decoding and short scoring batches).
//
//   y[j] = x[j]·Wᵀ + b  (+ scale_s · (x[j]·A[a_s]ᵀ)·B[a_s]ᵀ  for rows j of stream s whose adapter a_s >= 0)
//
// With R = streams × rows_per_stream <= 128 rows the op is bound by reading W once (2·N·K bytes), so:
//  * Each block owns a slice of BN output features (64 or 128 rows of W) and a contiguous range of K, and streams
//    ALL R rows of x through it: every element of W is read from HBM exactly once, for every stream at once.
//    K is split across blocks (split-K) when N/BN alone cannot fill the GPU; the partial sums go to an fp32
//    workspace and the last block of each feature slice adds them in a fixed order (deterministic).
//  * Tensor cores with the roles swapped (yᵀ = W·xᵀ): W is the 16-row "A" operand of mma.m16n8k16 and the few x
//    rows are the 8-wide "B" operand, so 16 rows of x waste nothing and 1 row wastes only MMA slots, never bytes.
//    W and x tiles move global -> shared with 16-byte cp.async in a 4-stage pipeline (XOR-swizzled, ldmatrix).
//  * The LoRA shrink xa = x·A[a]ᵀ (tiny: rank × K per row) runs first in its own small kernel, in fp32; on sm_90
//    the main kernel is launched as its programmatic dependent (PDL) so it streams W while the shrink runs and
//    waits for xa only in the epilogue. Base streams skip LoRA.
//  * The expand is fused in the epilogue, also on tensor cores: B[a]'s slice (prefetched into shared memory at
//    the start) times xa split into two 16-bit halves (hi + lo, ~16 mantissa bits, so xa is not rounded to
//    bf16), accumulated in fp32 and scaled per stream.
//  * Exactness: every row goes through the same instructions in the same order for the base part (acc + bias);
//    the LoRA term is added afterwards, so with lora_B == 0 an adapter stream's output equals the base stream's
//    (acc + bias + 0).
// bf16 and fp16 only (fp32 is not a tensor-core type here; the Triton/torch backends serve it).
// Every shared-memory address and accumulator coordinate comes from lora_small_tiles.cuh (host + device; the CPU
// tests check it against an emulation of ldmatrix/mma written from the PTX ISA).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdlib.h>

#include <atomic>
#include <mutex>

#include "hydra_kernels.h"
#include "lora_small_tiles.cuh"

namespace hydra {
namespace {

using lora::kBK;
using lora::kStages;
using lora::kThreads;
using lora::kWarpsM;
using lora::kWarpsN;
using lora::Layout;
using lora::make_layout;
using lora::rank_pitch;
using lora::block_n_of;
using lora::rows_block_of;
constexpr int kShrinkRows = 4;                       // shrink kernel: rows of x per block
constexpr int kShrinkRanks = 8;                      //                ranks (rows of A) per block
constexpr int kShrinkThreads = 256;
constexpr int kMaxDevices = 64;

// ------------------------------------------------------------------------------------ PTX helpers
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, bypassing L1; src_bytes = 0 zero-fills (out-of-range rows / K tail).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(addr)
               : "memory");
}

// Programmatic dependent launch (sm_90+; elsewhere the launch is ordinary and these are no-ops).
__device__ __forceinline__ void pdl_wait_for_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// ------------------------------------------------------------------------------------ element types
template <typename T>
struct Half16;

template <>
struct Half16<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  __device__ __forceinline__ static float lo(uint32_t w) { return __uint_as_float(w << 16); }
  __device__ __forceinline__ static float hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm(   // not volatile: a pure register operation the compiler may schedule freely
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

template <>
struct Half16<__half> {
  __device__ __forceinline__ static float to_float(__half v) { return __half2float(v); }
  __device__ __forceinline__ static __half from_float(float v) { return __float2half_rn(v); }
  __device__ __forceinline__ static float lo(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w & 0xffffu)));
  }
  __device__ __forceinline__ static float hi(uint32_t w) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(w >> 16)));
  }
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    asm(   // not volatile: a pure register operation the compiler may schedule freely
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
};

struct MainParams {
  const void* x;
  const void* w;
  const void* bias;
  const void* lora_B;
  const float* xa;
  void* y;
  float* ws;
  int* counters;
  int R, N, K, rank, rows_per_stream;
  int n_tiles, kt_per_split, k_tiles, splits;
  int n_used;
  int used_adapter[kLoraMaxStreams];
  int stream_adapter[kLoraMaxStreams];
  float stream_scale[kLoraMaxStreams];
};

// ------------------------------------------------------------------------------------ main kernel
template <typename T, int MW, int NI>
__global__ void __launch_bounds__(kThreads) lora_small_main_kernel(const MainParams p) {
  constexpr int MI = MW;                      // 16-row MMA tiles per warp along the features
  constexpr int BN = block_n_of(MW);
  constexpr int RB = rows_block_of(NI);
  using H = Half16<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int s_last;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp % kWarpsM, wn = warp / kWarpsM;
  const int tile = blockIdx.x / p.splits, split = blockIdx.x % p.splits;
  const int n0 = tile * BN;
  const int kt0 = split * p.kt_per_split;
  const int kt1 = min(kt0 + p.kt_per_split, p.k_tiles);
  const int nkt = max(kt1 - kt0, 0);
  const T* W = static_cast<const T*>(p.w);
  const T* X = static_cast<const T*>(p.x);
  const T* LB = static_cast<const T*>(p.lora_B);
  const Layout lay = make_layout(BN, RB, p.rank, p.n_used);
  const int rp = rank_pitch(lay.rank_pad);
  const uint32_t sbase = smem_addr(smem);
  const uint32_t sbpre = sbase + lay.region_bytes;

  // 1. Prefetch this slice of every used B[a] (it does not depend on the shrink kernel); first cp.async group.
  if (p.n_used > 0 && p.rank % 8 == 0) {
    const int cpr = lay.rank_pad / 8;          // 16-byte chunks per row
    const int total = p.n_used * BN * cpr;
    for (int c = tid; c < total; c += kThreads) {
      const int u = c / (BN * cpr), rem = c - u * BN * cpr;
      const int i = rem / cpr, t = (rem - i * cpr) * 8;
      const bool ok = n0 + i < p.N && t < p.rank;
      const T* src = ok ? LB + (static_cast<size_t>(p.used_adapter[u]) * p.N + n0 + i) * p.rank + t : LB;
      cp_async16(sbpre + u * BN * rp * 2 + lora::pad_offset(i, t, rp), src, ok);
    }
  }
  cp_async_commit();

  // 2. Stream W[n0:n0+BN, K range] and x[:, K range] through a kStages-deep pipeline.
  auto load_stage = [&](int slot, int kt) {
    const uint32_t sw = sbase + slot * lay.stage_bytes;
    const uint32_t sx = sw + BN * kBK * 2;
    const int k = kt * kBK;
#pragma unroll
    for (int it = 0; it < BN * 8 / kThreads; ++it) {
      const int c = tid + it * kThreads, row = c >> 3, ch = c & 7;
      const int kk = k + ch * 8;
      const bool ok = n0 + row < p.N && kk < p.K;
      cp_async16(sw + lora::swz(row, ch), ok ? W + static_cast<size_t>(n0 + row) * p.K + kk : W, ok);
    }
#pragma unroll
    for (int it = 0; it < (RB * 8 + kThreads - 1) / kThreads; ++it) {
      const int c = tid + it * kThreads, row = c >> 3, ch = c & 7;
      if (c < RB * 8) {
        const int kk = k + ch * 8;
        const bool ok = row < p.R && kk < p.K;
        cp_async16(sx + lora::swz(row, ch), ok ? X + static_cast<size_t>(row) * p.K + kk : X, ok);
      }
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  auto compute_stage = [&](int slot) {
    const uint32_t sw = sbase + slot * lay.stage_bytes;
    const uint32_t sx = sw + BN * kBK * 2;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t a[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) ldmatrix_x4(a[mi], sw + lora::a_ldm_offset(wm, mi, MI, kk, lane));
      uint32_t b[NI][2];
#pragma unroll
      for (int ni = 0; ni < NI; ni += 2) {
        if (ni + 1 < NI) {                       // two 8-row groups of x per ldmatrix.x4
          uint32_t t4[4];
          ldmatrix_x4(t4, sx + lora::b_ldm_offset_x4(wn, ni, NI, kk, lane));
          b[ni][0] = t4[0];
          b[ni][1] = t4[1];
          b[ni + 1][0] = t4[2];
          b[ni + 1][1] = t4[3];
        } else {
          ldmatrix_x2(b[ni], sx + lora::b_ldm_offset_x2(wn, ni, NI, kk, lane));
        }
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) H::mma(acc[mi][ni], a[mi], b[ni]);
    }
  };

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < nkt) load_stage(s, kt0 + s);
    cp_async_commit();
  }
  for (int it = 0; it < nkt; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int nxt = it + kStages - 1;
    if (nxt < nkt) load_stage(nxt % kStages, kt0 + nxt);
    cp_async_commit();
    compute_stage(it % kStages);
  }
  cp_async_wait<0>();
  __syncthreads();

  // 3. Everything below reads what the shrink kernel wrote (xa, zeroed counters).
  pdl_wait_for_primary();

  if (p.splits > 1) {
    // Partials [split][n_tiles*BN][RB]; the last block of this feature slice sums them in split order.
    float* ws = p.ws + static_cast<size_t>(split) * p.n_tiles * BN * RB;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        // elements (0, 1) and (2, 3): features i and i + 8, rows j and j + 1
        const int i = n0 + lora::acc_feature(wm, mi, MI, lane, 0), j = lora::acc_row(wn, ni, NI, lane, 0);
        __stcg(reinterpret_cast<float2*>(ws + static_cast<size_t>(i) * RB + j),
               make_float2(acc[mi][ni][0], acc[mi][ni][1]));
        __stcg(reinterpret_cast<float2*>(ws + static_cast<size_t>(i + 8) * RB + j),
               make_float2(acc[mi][ni][2], acc[mi][ni][3]));
      }
    __threadfence();
    __syncthreads();
    if (tid == 0) s_last = atomicAdd(p.counters + tile, 1) == p.splits - 1;
    __syncthreads();
    if (!s_last) return;
    __threadfence();
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int i = n0 + lora::acc_feature(wm, mi, MI, lane, 0), j = lora::acc_row(wn, ni, NI, lane, 0);
        for (int s = 0; s < p.splits; ++s) {
          const float* w0 = p.ws + static_cast<size_t>(s) * p.n_tiles * BN * RB;
          const float2 u = __ldcg(reinterpret_cast<const float2*>(w0 + static_cast<size_t>(i) * RB + j));
          const float2 v = __ldcg(reinterpret_cast<const float2*>(w0 + static_cast<size_t>(i + 8) * RB + j));
          if (s == 0) {
            acc[mi][ni][0] = u.x;
            acc[mi][ni][1] = u.y;
            acc[mi][ni][2] = v.x;
            acc[mi][ni][3] = v.y;
          } else {
            acc[mi][ni][0] += u.x;
            acc[mi][ni][1] += u.y;
            acc[mi][ni][2] += v.x;
            acc[mi][ni][3] += v.y;
          }
        }
      }
  }

  // 4. LoRA expand on tensor cores: lacc = Σ_a B[a][slice] · (xa rows of adapter a)ᵀ, xa as hi + lo halves.
  float lacc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) lacc[mi][ni][e] = 0.f;

  T* xh = reinterpret_cast<T*>(smem);
  T* xl = xh + RB * rp;
  if (p.n_used > 0) {
    if (p.rank % 8 != 0) {                     // ranks not a multiple of 8: B slices element by element
      T* bp = reinterpret_cast<T*>(smem + lay.region_bytes);
      const int total = p.n_used * BN * lay.rank_pad;
      for (int c = tid; c < total; c += kThreads) {
        const int u = c / (BN * lay.rank_pad), rem = c - u * BN * lay.rank_pad;
        const int i = rem / lay.rank_pad, t = rem - i * lay.rank_pad;
        const bool ok = n0 + i < p.N && t < p.rank;
        bp[u * BN * rp + lora::pad_offset(i, t, rp) / 2] =
            ok ? LB[(static_cast<size_t>(p.used_adapter[u]) * p.N + n0 + i) * p.rank + t] : H::from_float(0.f);
      }
    }
    for (int c = tid; c < RB * lay.rank_pad; c += kThreads) {
      const int j = c / lay.rank_pad, t = c - j * lay.rank_pad;
      float v = 0.f;
      if (j < p.R && t < p.rank && p.stream_adapter[j / p.rows_per_stream] >= 0) v = p.xa[j * p.rank + t];
      const T vh = H::from_float(v);
      xh[lora::pad_offset(j, t, rp) / 2] = vh;
      xl[lora::pad_offset(j, t, rp) / 2] = H::from_float(v - H::to_float(vh));
    }
    __syncthreads();
    const uint32_t sxh = smem_addr(xh), sxl = smem_addr(xl);
    for (int u = 0; u < p.n_used; ++u) {
      const int adapter = p.used_adapter[u];
      bool mine[NI];                           // this lane's B-fragment column (x row g) uses this adapter
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int j = lora::b_frag_row(wn, ni, NI, lane);
        mine[ni] = j < p.R && p.stream_adapter[j / p.rows_per_stream] == adapter;
      }
      const uint32_t sb = sbpre + u * BN * rp * 2;
      for (int kk = 0; kk < lay.rank_pad / 16; ++kk) {
        uint32_t a[MI][4];
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) ldmatrix_x4(a[mi], sb + lora::a_ldm_offset_padded(wm, mi, MI, kk, lane, rp));
#pragma unroll
        for (int ni = 0; ni < NI; ++ni) {
          const int off = lora::b_ldm_offset_padded_x2(wn, ni, NI, kk, lane, rp);
          uint32_t bh[2], bl[2];
          ldmatrix_x2(bh, sxh + off);
          ldmatrix_x2(bl, sxl + off);
          if (!mine[ni]) bh[0] = bh[1] = bl[0] = bl[1] = 0u;
#pragma unroll
          for (int mi = 0; mi < MI; ++mi) {
            H::mma(lacc[mi][ni], a[mi], bh);
            H::mma(lacc[mi][ni], a[mi], bl);
          }
        }
      }
    }
  }

  // 5. y = acc + bias (+ scale·lacc on adapter rows), staged in shared memory for coalesced stores.
  T* so = reinterpret_cast<T*>(smem + (p.n_used > 0 ? 2 * RB * rp * 2 : 0));
  constexpr int so_ld = BN + 8;
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int il = lora::acc_feature(wm, mi, MI, lane, 2 * half);
      const float bv = (bias != nullptr && n0 + il < p.N) ? H::to_float(bias[n0 + il]) : 0.f;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const int j = lora::acc_row(wn, ni, NI, lane, e);
          float v = acc[mi][ni][e] + bv;
          if (j < p.R) {
            const int s = j / p.rows_per_stream;
            if (p.stream_adapter[s] >= 0) v += p.stream_scale[s] * lacc[mi][ni][e];
          }
          so[j * so_ld + il] = H::from_float(v);
        }
    }
  __syncthreads();
  T* Y = static_cast<T*>(p.y);
  for (int c = tid; c < RB * BN; c += kThreads) {
    const int j = c / BN, il = c - j * BN;
    if (j < p.R && n0 + il < p.N) Y[static_cast<size_t>(j) * p.N + n0 + il] = so[j * so_ld + il];
  }
}

// ------------------------------------------------------------------------------------ shrink kernel
struct ShrinkParams {
  const void* x;
  const void* lora_A;
  float* xa;
  int* counters;
  int n_counters;
  int K, rank, rows_per_stream;
  int row_groups, rank_groups, work_blocks;
  int adapter_stream[kLoraMaxStreams];         // the streams that use an adapter, and their adapters
  int adapter_of[kLoraMaxStreams];
};

// xa[j, t] = Σ_k x[j, k]·A[a][t, k] in fp32; one block per (adapter stream, 4 rows, 8 ranks), K split across the
// threads and reduced in a fixed order. Block 0 also zeroes the split-K counters of the main kernel.
template <typename T>
__global__ void __launch_bounds__(kShrinkThreads) lora_shrink_kernel(const ShrinkParams p) {
  using H = Half16<T>;
  __shared__ float red[kShrinkThreads / 32][kShrinkRows * kShrinkRanks];
  pdl_launch_dependents();                      // the main kernel may start streaming W now
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (blockIdx.x == 0) {
    for (int c = tid; c < p.n_counters; c += kShrinkThreads) p.counters[c] = 0;
  }
  if (static_cast<int>(blockIdx.x) >= p.work_blocks) return;
  int b = blockIdx.x;
  const int tg = b % p.rank_groups;
  b /= p.rank_groups;
  const int rg = b % p.row_groups;
  const int u = b / p.row_groups;
  int stream = 0, adapter = 0;                  // selected with constant indices: keeps the params out of local memory
#pragma unroll
  for (int i = 0; i < kLoraMaxStreams; ++i) {
    if (i == u) {
      stream = p.adapter_stream[i];
      adapter = p.adapter_of[i];
    }
  }
  const int j0 = stream * p.rows_per_stream + rg * kShrinkRows;
  const int jn = min(kShrinkRows, p.rows_per_stream - rg * kShrinkRows);
  const int t0 = tg * kShrinkRanks;
  const int tn = min(kShrinkRanks, p.rank - t0);
  const T* X = static_cast<const T*>(p.x);
  const T* A = static_cast<const T*>(p.lora_A) + (static_cast<size_t>(adapter) * p.rank + t0) * p.K;

  float acc[kShrinkRows][kShrinkRanks];
#pragma unroll
  for (int rr = 0; rr < kShrinkRows; ++rr)
#pragma unroll
    for (int tt = 0; tt < kShrinkRanks; ++tt) acc[rr][tt] = 0.f;

  const int nvec = p.K / 8;
  for (int kv = tid; kv < nvec; kv += kShrinkThreads) {
    float xv[kShrinkRows][8];
#pragma unroll
    for (int rr = 0; rr < kShrinkRows; ++rr) {
      uint4 w = make_uint4(0u, 0u, 0u, 0u);
      if (rr < jn) w = __ldg(reinterpret_cast<const uint4*>(X + static_cast<size_t>(j0 + rr) * p.K) + kv);
      const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        xv[rr][2 * e] = H::lo(ws[e]);
        xv[rr][2 * e + 1] = H::hi(ws[e]);
      }
    }
#pragma unroll
    for (int tt = 0; tt < kShrinkRanks; ++tt) {
      if (tt < tn) {
        const uint4 w = __ldg(reinterpret_cast<const uint4*>(A + static_cast<size_t>(tt) * p.K) + kv);
        const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
        float av[8];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          av[2 * e] = H::lo(ws[e]);
          av[2 * e + 1] = H::hi(ws[e]);
        }
#pragma unroll
        for (int rr = 0; rr < kShrinkRows; ++rr)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[rr][tt] = fmaf(xv[rr][e], av[e], acc[rr][tt]);
      }
    }
  }

#pragma unroll
  for (int rr = 0; rr < kShrinkRows; ++rr)
#pragma unroll
    for (int tt = 0; tt < kShrinkRanks; ++tt) {
      float v = acc[rr][tt];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) red[warp][rr * kShrinkRanks + tt] = v;
    }
  __syncthreads();
  if (tid < kShrinkRows * kShrinkRanks) {
    const int rr = tid / kShrinkRanks, tt = tid % kShrinkRanks;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kShrinkThreads / 32; ++w) v += red[w][tid];
    if (rr < jn && tt < tn) p.xa[static_cast<size_t>(j0 + rr) * p.rank + t0 + tt] = v;
  }
}

// ------------------------------------------------------------------------------------ host side
int compute_major(int device) {
  static std::atomic<int> cache[kMaxDevices];
  if (device < 0 || device >= kMaxDevices) return 0;
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    if (cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return 0;
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v;
}

// cudaFuncSetAttribute(MaxDynamicSharedMemorySize) for one kernel instantiation on one device, once per size
// increase (it is a driver call). The cache is a static of a function templated on the instantiation's own
// parameters: a template on the kernel's pointer type would be ONE function for every instantiation (they all
// have the type void (*)(MainParams)), so a size set for one kernel would let another launch without its own
// opt-in and fail. The attribute only grows, under a lock, so concurrent launchers never lower it.
template <typename T, int MW, int NI>
cudaError_t allow_smem(int device, int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  const auto kernel = lora_small_main_kernel<T, MW, NI>;
  if (device < 0 || device >= kMaxDevices) {
    return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  }
  static std::atomic<int> done[kMaxDevices];
  static std::mutex mu;
  if (done[device].load(std::memory_order_acquire) >= bytes) return cudaSuccess;
  std::lock_guard<std::mutex> lock(mu);
  if (done[device].load(std::memory_order_relaxed) >= bytes) return cudaSuccess;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) done[device].store(bytes, std::memory_order_release);
  return err;
}

template <typename T, int MW, int NI>
cudaError_t launch_main(const MainParams& mp, int total_bytes, bool pdl, int device, cudaStream_t stream) {
  cudaError_t err = allow_smem<T, MW, NI>(device, total_bytes);
  if (err != cudaSuccess) return err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(mp.n_tiles * mp.splits));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(total_bytes);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, lora_small_main_kernel<T, MW, NI>, mp);
}

template <typename T, int MW>
cudaError_t launch_main_ni(int ni, const MainParams& mp, int bytes, bool pdl, int device, cudaStream_t stream) {
  switch (ni) {
    case 1: return launch_main<T, MW, 1>(mp, bytes, pdl, device, stream);
    case 2: return launch_main<T, MW, 2>(mp, bytes, pdl, device, stream);
    case 4: return launch_main<T, MW, 4>(mp, bytes, pdl, device, stream);
    case 8: return launch_main<T, MW, 8>(mp, bytes, pdl, device, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_all(const LoraSmallArgs& a, cudaStream_t stream) {
  const int rb = lora_small_rows_per_block(a.R);
  const int bn = lora_small_block_n(a.block_m_warps);
  const int rps = a.R / a.n_streams;
  const int k_tiles = (a.K + kBK - 1) / kBK;

  MainParams mp = {};
  mp.x = a.x;
  mp.w = a.weight;
  mp.bias = a.bias;
  mp.lora_B = a.lora_B;
  mp.xa = a.xa;
  mp.y = a.y;
  mp.ws = a.workspace;
  mp.counters = a.counters;
  mp.R = a.R;
  mp.N = a.N;
  mp.K = a.K;
  mp.rank = a.rank;
  mp.rows_per_stream = rps;
  mp.n_tiles = lora_small_num_tiles(a.N, a.block_m_warps);
  mp.k_tiles = k_tiles;
  const int splits = a.splits < k_tiles ? a.splits : k_tiles;
  mp.kt_per_split = (k_tiles + splits - 1) / splits;
  mp.splits = (k_tiles + mp.kt_per_split - 1) / mp.kt_per_split;   // no empty splits

  ShrinkParams sp = {};
  sp.x = a.x;
  sp.lora_A = a.lora_A;
  sp.xa = a.xa;
  sp.counters = a.counters;
  sp.n_counters = mp.splits > 1 ? mp.n_tiles : 0;
  sp.K = a.K;
  sp.rank = a.rank;
  sp.rows_per_stream = rps;
  sp.row_groups = (rps + kShrinkRows - 1) / kShrinkRows;
  sp.rank_groups = (a.rank + kShrinkRanks - 1) / kShrinkRanks;
  int n_adapter_streams = 0;
  for (int s = 0; s < a.n_streams; ++s) {
    mp.stream_adapter[s] = a.stream_adapter[s];
    mp.stream_scale[s] = a.stream_scale[s];
    const int ad = a.stream_adapter[s];
    if (ad < 0) continue;
    sp.adapter_stream[n_adapter_streams] = s;
    sp.adapter_of[n_adapter_streams] = ad;
    ++n_adapter_streams;
    bool seen = false;
    for (int u = 0; u < mp.n_used; ++u) seen = seen || mp.used_adapter[u] == ad;
    if (!seen) mp.used_adapter[mp.n_used++] = ad;
  }
  sp.work_blocks = n_adapter_streams * sp.row_groups * sp.rank_groups;

  const int bytes = static_cast<int>(lora_small_smem_bytes(a.R, a.rank, mp.n_used, a.block_m_warps));
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool shrink = sp.work_blocks > 0 || sp.n_counters > 0;
  if (shrink) {
    const unsigned grid = static_cast<unsigned>(sp.work_blocks > 0 ? sp.work_blocks : 1);
    lora_shrink_kernel<T><<<grid, kShrinkThreads, 0, stream>>>(sp);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  // HYDRA_KERNELS_NO_PDL=1 turns programmatic dependent launch off (plain stream order), e.g. to rule it out.
  static const bool no_pdl = [] {
    const char* v = getenv("HYDRA_KERNELS_NO_PDL");
    return v != nullptr && v[0] == '1';
  }();
  const bool pdl = shrink && !no_pdl && compute_major(device) >= 9;
  const int ni = rb / 16;
  if (a.block_m_warps == 1) return launch_main_ni<T, 1>(ni, mp, bytes, pdl, device, stream);
  if (a.block_m_warps == 2) return launch_main_ni<T, 2>(ni, mp, bytes, pdl, device, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

int lora_small_rows_per_block(int R) {
  for (int ni = 1; ni <= 8; ni *= 2) {
    if (R <= rows_block_of(ni)) return rows_block_of(ni);
  }
  return 0;
}

int lora_small_block_n(int block_m_warps) { return block_n_of(block_m_warps); }

int lora_small_num_tiles(int N, int block_m_warps) {
  const int bn = block_n_of(block_m_warps);
  return (N + bn - 1) / bn;
}

size_t lora_small_workspace_floats(int N, int R, int block_m_warps, int splits) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(splits) * lora_small_num_tiles(N, block_m_warps) * block_n_of(block_m_warps) *
         lora_small_rows_per_block(R);
}

size_t lora_small_smem_bytes(int R, int rank, int n_used_adapters, int block_m_warps) {
  const Layout l = make_layout(block_n_of(block_m_warps), lora_small_rows_per_block(R), rank, n_used_adapters);
  return static_cast<size_t>(l.total_bytes);
}

cudaError_t lora_small_forward(const LoraSmallArgs& a, cudaStream_t stream) {
  if (a.R <= 0 || a.N <= 0) return cudaSuccess;
  if (a.n_streams < 1 || a.n_streams > kLoraMaxStreams || a.R % a.n_streams != 0) return cudaErrorInvalidValue;
  if (a.R > kLoraMaxRows || a.K <= 0 || a.K % 8 != 0 || a.rank < 0 || a.rank > kLoraMaxRank) {
    return cudaErrorInvalidValue;
  }
  if ((a.block_m_warps != 1 && a.block_m_warps != 2) || a.splits < 1) return cudaErrorInvalidValue;
  switch (a.dtype) {
    case DType::kBFloat16: return launch_all<__nv_bfloat16>(a, stream);
    case DType::kFloat16: return launch_all<__half>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace hydra
