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
//    running max moves), then warp shuffles and one shared-memory step across warps. Entropy and the full KL are
//    accumulated in max-shifted form (sum e^(z-m)(z-m), sum e^(z-m)((z-m)-(z_ref-m_ref))) and rescaled with the
//    sums, as in the Triton kernel, so no term loses digits against a large logit.
//  * Nothing reads past the end of a row: columns >= V are never loaded, so there is nothing to mask ("phantom
//    tokens" cannot happen); logits that are -inf contribute exp(-inf) = 0, and 0·log 0 = 0 is enforced.
//  * One exp per element per model, on the special-function unit (ex2.approx, the instruction expf and tl.exp
//    use): ~2^-22 relative error per term. Logs, the rare rescale exps and the per-row formulas use the
//    accurate logf/expf. No --use_fast_math anywhere.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <float.h>
#include <stdint.h>

#include "hydra_kernels.h"

namespace hydra {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kMaxThreads = 512;
constexpr int kMaxWarps = kMaxThreads / 32;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// 2^x on the special-function unit. -inf -> 0, NaN -> NaN. ftz: results below 2^-126 (terms e^-87 below the row
// maximum) flush to 0, far below the resolution of the fp32 sums they would be added to.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// ------------------------------------------------------------------------------------------ element access
// Logits are streamed once: loads and stores use the evict-first cache hint (__ldcs/__stcs).
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  __device__ __forceinline__ static float load1(const float* p) { return __ldcs(p); }
  __device__ __forceinline__ static void load_vec(const float* p, float* z) {
    const float4 v = __ldcs(reinterpret_cast<const float4*>(p));
    z[0] = v.x;
    z[1] = v.y;
    z[2] = v.z;
    z[3] = v.w;
  }
  __device__ __forceinline__ static void store1(float* p, float v) { __stcs(p, v); }
  __device__ __forceinline__ static void store_vec(float* p, const float* v) {
    __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float from_bits(unsigned int b) { return __uint_as_float(b << 16); }
  __device__ __forceinline__ static unsigned int to_bits(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  __device__ __forceinline__ static float load1(const __nv_bfloat16* p) {
    return from_bits(__ldcs(reinterpret_cast<const unsigned short*>(p)));
  }
  __device__ __forceinline__ static void load_vec(const __nv_bfloat16* p, float* z) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      z[2 * i] = __uint_as_float(w[i] << 16);
      z[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
  __device__ __forceinline__ static void store1(__nv_bfloat16* p, float v) {
    __stcs(reinterpret_cast<unsigned short*>(p), static_cast<unsigned short>(to_bits(v)));
  }
  __device__ __forceinline__ static void store_vec(__nv_bfloat16* p, const float* v) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = to_bits(v[2 * i]) | (to_bits(v[2 * i + 1]) << 16);
    __stcs(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  __device__ __forceinline__ static float from_bits(unsigned int b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  __device__ __forceinline__ static unsigned int to_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ __forceinline__ static float load1(const __half* p) {
    return from_bits(__ldcs(reinterpret_cast<const unsigned short*>(p)));
  }
  __device__ __forceinline__ static void load_vec(const __half* p, float* z) {
    const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      z[2 * i] = from_bits(w[i] & 0xffffu);
      z[2 * i + 1] = from_bits(w[i] >> 16);
    }
  }
  __device__ __forceinline__ static void store1(__half* p, float v) {
    __stcs(reinterpret_cast<unsigned short*>(p), static_cast<unsigned short>(to_bits(v)));
  }
  __device__ __forceinline__ static void store_vec(__half* p, const float* v) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = to_bits(v[2 * i]) | (to_bits(v[2 * i + 1]) << 16);
    __stcs(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  }
};

template <typename T>
__device__ __forceinline__ int phase_of(const T* p) {
  return static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % Elem<T>::kVec);
}

__device__ __forceinline__ bool same_16b_phase(const void* a, const void* b) {
  return ((reinterpret_cast<uintptr_t>(a) ^ reinterpret_cast<uintptr_t>(b)) & 15u) == 0;
}

// ------------------------------------------------------------------------------------ online softmax state
// m: running max of z; s = sum e^(z - mu); a = sum e^(z - mu) (z - mu) (entropy); the same m/s for the
// reference; c = sum e^(z - mu) ((z - mu) - (z_ref - mu_ref)) (full KL). mu = m, or 0 while m is -inf (nothing
// live seen yet), the Triton kernel's convention, so -inf - -inf never happens.
struct State {
  float m, s, a, mr, sr, c;
};

__device__ __forceinline__ State empty_state() { return State{neg_inf(), 0.f, 0.f, neg_inf(), 0.f, 0.f}; }

// How a sum taken relative to m_old moves to m_new >= m_old: multiply by alpha = e^delta, delta = m_old - m_new.
__device__ __forceinline__ void shift(float m_old, float m_new, float& alpha, float& delta) {
  if (m_old == m_new) {
    alpha = 1.f;
    delta = 0.f;
  } else if (m_old == neg_inf()) {   // everything summed so far was -inf: the sums are 0 (or inf for c)
    alpha = 0.f;
    delta = 0.f;
  } else {
    delta = m_old - m_new;
    alpha = expf(delta);
  }
}

template <bool ENT, bool REF, bool FULL>
__device__ __forceinline__ void rescale(State& st, float m_new, float mr_new) {
  float al, dl, alr = 1.f, dlr = 0.f;
  shift(st.m, m_new, al, dl);
  if (REF) shift(st.mr, mr_new, alr, dlr);
  if (FULL) st.c = al * (st.c + (dl - dlr) * st.s);
  if (ENT) st.a = al * (st.a + dl * st.s);
  st.s *= al;
  st.m = m_new;
  if (REF) {
    st.sr *= alr;
    st.mr = mr_new;
  }
}

// Adds N elements (z: actor, zr: reference at the same columns), already divided by the temperature.
template <bool ENT, bool REF, bool FULL, int N>
__device__ __forceinline__ void update(State& st, const float* z, const float* zr) {
  float cm = z[0], cmr = 0.f;
#pragma unroll
  for (int i = 1; i < N; ++i) cm = fmaxf(cm, z[i]);
  if (REF) {
    cmr = zr[0];
#pragma unroll
    for (int i = 1; i < N; ++i) cmr = fmaxf(cmr, zr[i]);
  }
  const bool up = cm > st.m;
  const bool upr = REF && cmr > st.mr;
  if (up || upr) rescale<ENT, REF, FULL>(st, up ? cm : st.m, upr ? cmr : st.mr);   // rare after the first chunks
  const float mu = st.m == neg_inf() ? 0.f : st.m;
  const float mur = REF ? (st.mr == neg_inf() ? 0.f : st.mr) : 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float t = z[i] - mu;
    const float e = fast_exp2(t * kLog2e);
    st.s += e;
    // fmaxf keeps e·t finite where t = -inf (e = 0 there); a NaN logit still reaches s through e.
    if (ENT) st.a = fmaf(e, fmaxf(t, -FLT_MAX), st.a);
    if (REF) {
      const float tr = zr[i] - mur;
      st.sr += fast_exp2(tr * kLog2e);
      // p = 0 contributes 0 even where the reference is -inf too (0·log 0); p > 0 against a -inf reference is +inf.
      if (FULL) st.c += e > 0.f ? e * (t - tr) : 0.f;
    }
  }
}

template <bool ENT, bool REF, bool FULL>
__device__ __forceinline__ State merge(const State& x, const State& y) {
  State o = empty_state();
  float ax, dx, ay, dy;
  o.m = fmaxf(x.m, y.m);
  shift(x.m, o.m, ax, dx);
  shift(y.m, o.m, ay, dy);
  o.s = ax * x.s + ay * y.s;
  if (ENT) o.a = ax * (x.a + dx * x.s) + ay * (y.a + dy * y.s);
  if (REF) {
    float arx, drx, ary, dry;
    o.mr = fmaxf(x.mr, y.mr);
    shift(x.mr, o.mr, arx, drx);
    shift(y.mr, o.mr, ary, dry);
    o.sr = arx * x.sr + ary * y.sr;
    if (FULL) o.c = ax * (x.c + (dx - drx) * x.s) + ay * (y.c + (dy - dry) * y.s);
  }
  return o;
}

template <bool ENT, bool REF, bool FULL>
__device__ __forceinline__ State shfl_xor(const State& st, int offset) {
  State o = empty_state();
  o.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
  o.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
  if (ENT) o.a = __shfl_xor_sync(0xffffffffu, st.a, offset);
  if (REF) {
    o.mr = __shfl_xor_sync(0xffffffffu, st.mr, offset);
    o.sr = __shfl_xor_sync(0xffffffffu, st.sr, offset);
  }
  if (FULL) o.c = __shfl_xor_sync(0xffffffffu, st.c, offset);
  return o;
}

// Fixed reduction tree (deterministic). The result is valid in thread 0.
template <bool ENT, bool REF, bool FULL>
__device__ __forceinline__ State block_reduce(State st, State* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) st = merge<ENT, REF, FULL>(st, shfl_xor<ENT, REF, FULL>(st, off));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) smem[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < static_cast<int>(blockDim.x >> 5) ? smem[lane] : empty_state();
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) st = merge<ENT, REF, FULL>(st, shfl_xor<ENT, REF, FULL>(st, off));
  }
  return st;
}

// e^d - 1 - d without cancellation (the Triton kernel's series, to d^10/10!, for |d| < 0.5).
__device__ __forceinline__ float k3_estimator(float d) {
  if (fabsf(d) < 0.5f) {
    return d * d * (0.5f + d * (1.f / 6.f + d * (1.f / 24.f + d * (1.f / 120.f + d * (1.f / 720.f + d * (
        1.f / 5040.f + d * (1.f / 40320.f + d * (1.f / 362880.f + d * (1.f / 3628800.f)))))))));
  }
  return expf(d) - 1.f - d;
}

// ---------------------------------------------------------------------------------------------- forward
template <typename T, bool REF, bool FULL>
__global__ void __launch_bounds__(kMaxThreads) logprobs_fwd_kernel(const LogprobsFwdArgs args) {
  constexpr bool ENT = REF;   // entropy is an output of logprobs_and_kl only (not of token_logprobs)
  constexpr int VEC = Elem<T>::kVec;
  __shared__ State red[kMaxWarps];
  const T* X = static_cast<const T*>(args.logits);
  const T* RX = static_cast<const T*>(args.ref_logits);
  const int64_t rows = args.B * args.T, V = args.V;
  const float inv_t = args.inv_temperature;
  const int tid = threadIdx.x, bs = blockDim.x;

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
      zt = Elem<T>::load1(x + tgt) * inv_t;
      if (REF) zrt = Elem<T>::load1(r + tgt) * inv_t;
    }

    State st = empty_state();
    float z[2 * VEC], zr[2 * VEC];
    if (!REF || same_16b_phase(x, r)) {
      const int64_t pro = min(static_cast<int64_t>((VEC - phase_of(x)) % VEC), V);
      const int64_t nv = (V - pro) / VEC;
      const int64_t tail = pro + nv * VEC;
      if (tid < pro) {
        z[0] = Elem<T>::load1(x + tid) * inv_t;
        if (REF) zr[0] = Elem<T>::load1(r + tid) * inv_t;
        update<ENT, REF, FULL, 1>(st, z, zr);
      }
      if (tid < V - tail) {
        z[0] = Elem<T>::load1(x + tail + tid) * inv_t;
        if (REF) zr[0] = Elem<T>::load1(r + tail + tid) * inv_t;
        update<ENT, REF, FULL, 1>(st, z, zr);
      }
      const T* xv = x + pro;
      const T* rv = REF ? r + pro : nullptr;
      int64_t i = tid;
      for (; i + bs < nv; i += 2 * bs) {         // two 16-byte loads per model in flight per thread
        Elem<T>::load_vec(xv + i * VEC, z);
        Elem<T>::load_vec(xv + (i + bs) * VEC, z + VEC);
        if (REF) {
          Elem<T>::load_vec(rv + i * VEC, zr);
          Elem<T>::load_vec(rv + (i + bs) * VEC, zr + VEC);
        }
#pragma unroll
        for (int k = 0; k < 2 * VEC; ++k) {
          z[k] *= inv_t;
          if (REF) zr[k] *= inv_t;
        }
        update<ENT, REF, FULL, 2 * VEC>(st, z, zr);
      }
      if (i < nv) {
        Elem<T>::load_vec(xv + i * VEC, z);
        if (REF) Elem<T>::load_vec(rv + i * VEC, zr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          z[k] *= inv_t;
          if (REF) zr[k] *= inv_t;
        }
        update<ENT, REF, FULL, VEC>(st, z, zr);
      }
    } else {                                     // actor and reference rows differently aligned: scalars
      int64_t c = tid;
      for (; c + 3 * bs < V; c += 4 * bs) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          z[k] = Elem<T>::load1(x + c + k * bs) * inv_t;
          zr[k] = Elem<T>::load1(r + c + k * bs) * inv_t;
        }
        update<ENT, REF, FULL, 4>(st, z, zr);
      }
      for (; c < V; c += bs) {
        z[0] = Elem<T>::load1(x + c) * inv_t;
        zr[0] = Elem<T>::load1(r + c) * inv_t;
        update<ENT, REF, FULL, 1>(st, z, zr);
      }
    }

    st = block_reduce<ENT, REF, FULL>(st, red);
    if (tid == 0) {
      const float log_s = logf(st.s);
      const float lp = in_range ? (zt - st.m) - log_s : quiet_nan();
      args.logp[row] = lp;
      float log_sr = 0.f;
      if (REF) {
        log_sr = logf(st.sr);
        const float rlp = in_range ? (zrt - st.mr) - log_sr : quiet_nan();
        // d = ref_logp - logp regrouped (as in the Triton kernel) so that huge logits cancel before rounding:
        // with |z| ~ 1e4 each log-prob carries ~1e-3 of fp32 rounding, (z_ref_t - z_t), (m - m_ref) and
        // (log_s - log_sr) do not.
        const float d = in_range ? ((zrt - zt) + (st.m - st.mr)) + (log_s - log_sr) : quiet_nan();
        float k;
        if (FULL) {
          k = st.c / st.s - log_s + log_sr;
        } else if (args.kl_mode == kKlK1) {
          k = -d;
        } else if (args.kl_mode == kKlK2) {
          k = 0.5f * d * d;
        } else {
          k = k3_estimator(d);
        }
        args.ref_logp[row] = rlp;
        args.kl[row] = k;
        args.entropy[row] = log_s - st.a / st.s;
      }
      reinterpret_cast<float4*>(args.stats)[row] =
          make_float4(st.m, log_s, REF ? st.mr : 0.f, REF ? log_sr : 0.f);
    }
    __syncthreads();   // `red` is reused by the next row
  }
}

// --------------------------------------------------------------------------------------------- backward
// dz_v = p_v (coef0 - gh log p_v + gf (log p_v - log p_ref_v)) + g [v == target], every coefficient already
// multiplied by 1/temperature (dlogits = dz / T).
struct BwdRow {
  float m, log_s, mr, log_sr, coef0, gh, gf, g, inv_t;
};

template <bool NEED_REF>
__device__ __forceinline__ float grad_elem(const BwdRow& c, float zx, float zrx) {
  const float lp = (zx * c.inv_t - c.m) - c.log_s;
  const float p = fast_exp2(lp * kLog2e);
  float inner = fmaf(-c.gh, lp, c.coef0);
  if (NEED_REF) inner = fmaf(c.gf, lp - ((zrx * c.inv_t - c.mr) - c.log_sr), inner);
  return p == 0.f ? 0.f : p * inner;     // p = 0 (logit -inf): exactly 0, never 0·inf; NaN logits stay NaN
}

template <typename T>
__device__ void zero_row(T* dx, int64_t V) {
  constexpr int VEC = Elem<T>::kVec;
  const int tid = threadIdx.x, bs = blockDim.x;
  const int64_t pro = min(static_cast<int64_t>((VEC - phase_of(dx)) % VEC), V);
  const int64_t nv = (V - pro) / VEC, tail = pro + nv * VEC;
  const float zeros[VEC] = {};
  if (tid < pro) Elem<T>::store1(dx + tid, 0.f);
  if (tid < V - tail) Elem<T>::store1(dx + tail + tid, 0.f);
  for (int64_t i = tid; i < nv; i += bs) Elem<T>::store_vec(dx + pro + i * VEC, zeros);
}

template <typename T, bool NEED_REF>
__global__ void __launch_bounds__(kMaxThreads) logprobs_bwd_kernel(const LogprobsBwdArgs args) {
  constexpr int VEC = Elem<T>::kVec;
  const T* X = static_cast<const T*>(args.logits);
  const T* RX = static_cast<const T*>(args.ref_logits);
  T* DX = static_cast<T*>(args.dlogits);
  const int64_t rows = args.B * args.T, V = args.V;
  const int tid = threadIdx.x, bs = blockDim.x;
  const bool sampled_kl = args.grad_kl != nullptr && args.kl_mode >= kKlK1 && args.kl_mode <= kKlK3;

  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t bi = row / args.T, ti = row - bi * args.T;
    const T* x = X + bi * args.sx_b + ti * args.sx_t;
    const T* r = NEED_REF ? RX + bi * args.sr_b + ti * args.sr_t : nullptr;
    T* dx = DX + row * V;
    const int64_t tgt = args.targets[row];
    if (tgt == args.ignore_index) {          // all four outputs are constant 0 there: the gradient is 0
      zero_row(dx, V);
      continue;
    }

    // Per-row coefficients (the same few floats for every thread; served by L1).
    float g = args.grad_logp != nullptr ? args.grad_logp[row] : 0.f;
    if (sampled_kl) {
      const float gk = args.grad_kl[row], lp = args.logp[row], rlp = args.ref_logp[row];
      if (args.kl_mode == kKlK1) {
        g += gk;
      } else if (args.kl_mode == kKlK2) {
        g += gk * (lp - rlp);
      } else {
        g += gk * (1.f - expf(rlp - lp));
      }
    }
    float gh = 0.f, h = 0.f, gf = 0.f, kf = 0.f;
    if (args.grad_entropy != nullptr) {
      gh = args.grad_entropy[row];
      h = args.entropy[row];
    }
    if (NEED_REF) {
      gf = args.grad_kl[row];
      kf = args.kl[row];
    }
    const float4 sv = reinterpret_cast<const float4*>(args.stats)[row];
    const float inv_t = args.inv_temperature;
    const BwdRow c{sv.x, sv.y, sv.z, sv.w, (-g - gh * h - gf * kf) * inv_t, gh * inv_t, gf * inv_t, g * inv_t,
                   inv_t};

    float z[2 * VEC], zr[2 * VEC], o[2 * VEC];
    const bool vec_ok = same_16b_phase(x, dx) && (!NEED_REF || same_16b_phase(x, r));
    if (vec_ok) {
      const int64_t pro = min(static_cast<int64_t>((VEC - phase_of(x)) % VEC), V);
      const int64_t nv = (V - pro) / VEC;
      const int64_t tail = pro + nv * VEC;
      // Scalar head and tail (< VEC elements each).
#pragma unroll
      for (int part = 0; part < 2; ++part) {
        const int64_t col = part == 0 ? tid : tail + tid;
        if (part == 0 ? tid < pro : tid < V - tail) {
          const float zrx = NEED_REF ? Elem<T>::load1(r + col) : 0.f;
          const float v = grad_elem<NEED_REF>(c, Elem<T>::load1(x + col), zrx) + (col == tgt ? c.g : 0.f);
          Elem<T>::store1(dx + col, v);
        }
      }
      const T* xv = x + pro;
      const T* rv = NEED_REF ? r + pro : nullptr;
      T* dv = dx + pro;
      int64_t i = tid;
      for (; i + bs < nv; i += 2 * bs) {
        Elem<T>::load_vec(xv + i * VEC, z);
        Elem<T>::load_vec(xv + (i + bs) * VEC, z + VEC);
        if (NEED_REF) {
          Elem<T>::load_vec(rv + i * VEC, zr);
          Elem<T>::load_vec(rv + (i + bs) * VEC, zr + VEC);
        }
#pragma unroll
        for (int k = 0; k < 2 * VEC; ++k) o[k] = grad_elem<NEED_REF>(c, z[k], NEED_REF ? zr[k] : 0.f);
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {          // the target column: one compare per vector
          const int64_t off = tgt - (pro + (i + h2 * bs) * VEC);
          if (off >= 0 && off < VEC) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) o[h2 * VEC + k] += k == off ? c.g : 0.f;
          }
        }
        Elem<T>::store_vec(dv + i * VEC, o);
        Elem<T>::store_vec(dv + (i + bs) * VEC, o + VEC);
      }
      if (i < nv) {
        Elem<T>::load_vec(xv + i * VEC, z);
        if (NEED_REF) Elem<T>::load_vec(rv + i * VEC, zr);
#pragma unroll
        for (int k = 0; k < VEC; ++k) o[k] = grad_elem<NEED_REF>(c, z[k], NEED_REF ? zr[k] : 0.f);
        const int64_t off = tgt - (pro + i * VEC);
        if (off >= 0 && off < VEC) {
#pragma unroll
          for (int k = 0; k < VEC; ++k) o[k] += k == off ? c.g : 0.f;
        }
        Elem<T>::store_vec(dv + i * VEC, o);
      }
    } else {                                     // rows differently aligned: coalesced scalars
      for (int64_t col = tid; col < V; col += bs) {
        const float zrx = NEED_REF ? Elem<T>::load1(r + col) : 0.f;
        const float v = grad_elem<NEED_REF>(c, Elem<T>::load1(x + col), zrx) + (col == tgt ? c.g : 0.f);
        Elem<T>::store1(dx + col, v);
      }
    }
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
