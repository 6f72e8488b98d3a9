// The per-row work of csrc/logprobs.cu: what one thread of a row's block computes, and the per-row formulas.
//
// Host + device: the kernels call these with (threadIdx.x, blockDim.x); tests/kernels/test_cuda_compile.py
// compiles this header with a plain host C++ compiler and replays a block thread by thread on the CPU (same
// chunking, same merge tree), so the online-softmax algebra, the alignment head/tail handling and the backward
// formula are checked against float64 on machines without a GPU. Only the exp2 instruction differs on the host
// (exp2f with the same flush-to-zero); loads drop the cache hints.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__CUDACC__)
#define HK_HD __host__ __device__ __forceinline__
#else
#define HK_HD inline
#endif
// Unrolling matters in device code only (host compilers would warn about the pragma).
#if defined(__CUDA_ARCH__)
#define HK_UNROLL _Pragma("unroll")
#else
#define HK_UNROLL
#endif

namespace hydra {
namespace lp {

constexpr float kLog2e = 1.4426950408889634f;

HK_HD float neg_inf() { return -INFINITY; }
HK_HD float quiet_nan() { return NAN; }
HK_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// 2^x on the special-function unit (what expf and Triton's tl.exp use): ~2^-22 relative error; -inf -> 0,
// NaN -> NaN; ftz: results below 2^-126 (terms e^-87 below the row maximum) flush to 0, far below the
// resolution of the fp32 sums they would be added to.
HK_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  const float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.f : y;
#endif
}

// ------------------------------------------------------------------------------------------ element access
// Logits are streamed once: on the device, loads and stores use the evict-first hint (__ldcs/__stcs).
// Host replays (tests) check what the device would fault on: a 16-byte access that is not 16-byte aligned.
#if !defined(__CUDA_ARCH__) && defined(HK_HOST_CHECK_ALIGN)
#define HK_CHECK_ALIGN(p, n) \
  if (sizeof(*(p)) == 16 && reinterpret_cast<uintptr_t>(p) % 16 != 0) abort()
#else
#define HK_CHECK_ALIGN(p, n)
#endif

template <typename V>
HK_HD V ld(const V* p) {
#if defined(__CUDA_ARCH__)
  return __ldcs(p);
#else
  HK_CHECK_ALIGN(p, 16);
  V v;
  memcpy(&v, p, sizeof(V));
  return v;
#endif
}

template <typename V>
HK_HD void st(V* p, const V& v) {
#if defined(__CUDA_ARCH__)
  __stcs(p, v);
#else
  HK_CHECK_ALIGN(p, 16);
  memcpy(p, &v, sizeof(V));
#endif
}

HK_HD float bf16_bits_to_float(unsigned int b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b << 16);
#else
  const unsigned int u = b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static constexpr int kVec = 4;
  HK_HD static float load1(const float* p) { return ld(p); }
  HK_HD static void load_vec(const float* p, float* z) {
    const float4 v = ld(reinterpret_cast<const float4*>(p));
    z[0] = v.x;
    z[1] = v.y;
    z[2] = v.z;
    z[3] = v.w;
  }
  HK_HD static void store1(float* p, float v) { st(p, v); }
  HK_HD static void store_vec(float* p, const float* v) {
    st(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kVec = 8;
  HK_HD static unsigned int to_bits(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
  HK_HD static float load1(const __nv_bfloat16* p) {
    return bf16_bits_to_float(ld(reinterpret_cast<const unsigned short*>(p)));
  }
  HK_HD static void load_vec(const __nv_bfloat16* p, float* z) {
    const uint4 v = ld(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; ++i) {
      z[2 * i] = bf16_bits_to_float(w[i] & 0xffffu);
      z[2 * i + 1] = bf16_bits_to_float(w[i] >> 16);
    }
  }
  HK_HD static void store1(__nv_bfloat16* p, float v) {
    st(reinterpret_cast<unsigned short*>(p), static_cast<unsigned short>(to_bits(v)));
  }
  HK_HD static void store_vec(__nv_bfloat16* p, const float* v) {
    unsigned int w[4];
    for (int i = 0; i < 4; ++i) w[i] = to_bits(v[2 * i]) | (to_bits(v[2 * i + 1]) << 16);
    st(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  }
};

template <>
struct Elem<__half> {
  static constexpr int kVec = 8;
  HK_HD static float from_bits(unsigned int b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  HK_HD static unsigned int to_bits(float v) { return __half_as_ushort(__float2half_rn(v)); }
  HK_HD static float load1(const __half* p) { return from_bits(ld(reinterpret_cast<const unsigned short*>(p))); }
  HK_HD static void load_vec(const __half* p, float* z) {
    const uint4 v = ld(reinterpret_cast<const uint4*>(p));
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
    for (int i = 0; i < 4; ++i) {
      z[2 * i] = from_bits(w[i] & 0xffffu);
      z[2 * i + 1] = from_bits(w[i] >> 16);
    }
  }
  HK_HD static void store1(__half* p, float v) {
    st(reinterpret_cast<unsigned short*>(p), static_cast<unsigned short>(to_bits(v)));
  }
  HK_HD static void store_vec(__half* p, const float* v) {
    unsigned int w[4];
    for (int i = 0; i < 4; ++i) w[i] = to_bits(v[2 * i]) | (to_bits(v[2 * i + 1]) << 16);
    st(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  }
};

// Elements before the row's first 16-byte boundary (the scalar head of a vectorised row).
template <typename T>
HK_HD int64_t head_len(const T* p, int64_t V) {
  constexpr int VEC = Elem<T>::kVec;
  const int phase = static_cast<int>((reinterpret_cast<uintptr_t>(p) / sizeof(T)) % VEC);
  return min64((VEC - phase) % VEC, V);
}

HK_HD bool same_16b_phase(const void* a, const void* b) {
  return ((reinterpret_cast<uintptr_t>(a) ^ reinterpret_cast<uintptr_t>(b)) & 15u) == 0;
}

// ------------------------------------------------------------------------------------ online softmax state
// m: running max of z; s = sum e^(z - mu); a = sum e^(z - mu) (z - mu) (entropy); the same m/s for the
// reference; c = sum e^(z - mu) ((z - mu) - (z_ref - mu_ref)) (full KL). mu = m, or 0 while m is -inf (nothing
// live seen yet), the Triton kernel's convention, so -inf - -inf never happens.
struct State {
  float m, s, a, mr, sr, c;
};

HK_HD State empty_state() { return State{neg_inf(), 0.f, 0.f, neg_inf(), 0.f, 0.f}; }

// How a sum taken relative to m_old moves to m_new >= m_old: multiply by alpha = e^delta, delta = m_old - m_new.
HK_HD void shift(float m_old, float m_new, float& alpha, float& delta) {
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
HK_HD void rescale(State& s, float m_new, float mr_new) {
  float al, dl, alr = 1.f, dlr = 0.f;
  shift(s.m, m_new, al, dl);
  if (REF) shift(s.mr, mr_new, alr, dlr);
  if (FULL) s.c = al * (s.c + (dl - dlr) * s.s);
  if (ENT) s.a = al * (s.a + dl * s.s);
  s.s *= al;
  s.m = m_new;
  if (REF) {
    s.sr *= alr;
    s.mr = mr_new;
  }
}

// Adds N elements (z: actor, zr: reference at the same columns), already multiplied by 1/temperature.
template <bool ENT, bool REF, bool FULL, int N>
HK_HD void update(State& s, const float* z, const float* zr) {
  float cm = z[0], cmr = 0.f;
HK_UNROLL
  for (int i = 1; i < N; ++i) cm = fmaxf(cm, z[i]);
  if (REF) {
    cmr = zr[0];
HK_UNROLL
    for (int i = 1; i < N; ++i) cmr = fmaxf(cmr, zr[i]);
  }
  const bool up = cm > s.m;
  const bool upr = REF && cmr > s.mr;
  if (up || upr) rescale<ENT, REF, FULL>(s, up ? cm : s.m, upr ? cmr : s.mr);   // rare after the first chunks
  const float mu = s.m == neg_inf() ? 0.f : s.m;
  const float mur = REF ? (s.mr == neg_inf() ? 0.f : s.mr) : 0.f;
HK_UNROLL
  for (int i = 0; i < N; ++i) {
    const float t = z[i] - mu;
    const float e = fast_exp2(t * kLog2e);
    s.s += e;
    // fmaxf keeps e·t finite where t = -inf (e = 0 there); a NaN logit still reaches s through e.
    if (ENT) s.a = fmaf(e, fmaxf(t, -3.402823466e38f), s.a);
    if (REF) {
      const float tr = zr[i] - mur;
      s.sr += fast_exp2(tr * kLog2e);
      // p = 0 contributes 0 even where the reference is -inf too (0·log 0); p > 0 against a -inf reference is +inf.
      if (FULL) s.c += e > 0.f ? e * (t - tr) : 0.f;
    }
  }
}

template <bool ENT, bool REF, bool FULL>
HK_HD State merge(const State& x, const State& y) {
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

// What thread `tid` of a `bs`-thread block accumulates over one row: the scalar head (< VEC elements before the
// first 16-byte boundary, threads 0..), the scalar tail (after the last full vector), and vectors tid, tid+bs,
// ... two at a time (two 16-byte loads per model in flight). Rows of the actor and the reference that are not
// equally aligned are read as coalesced scalars instead.
template <typename T, bool ENT, bool REF, bool FULL>
HK_HD State thread_row_forward(const T* x, const T* r, int64_t V, float inv_t, int tid, int bs) {
  constexpr int VEC = Elem<T>::kVec;
  State s = empty_state();
  float z[2 * VEC], zr[2 * VEC];
  if (!REF || same_16b_phase(x, r)) {
    const int64_t pro = head_len(x, V);
    const int64_t nv = (V - pro) / VEC;
    const int64_t tail = pro + nv * VEC;
    if (tid < pro) {
      z[0] = Elem<T>::load1(x + tid) * inv_t;
      if (REF) zr[0] = Elem<T>::load1(r + tid) * inv_t;
      update<ENT, REF, FULL, 1>(s, z, zr);
    }
    if (tid < V - tail) {
      z[0] = Elem<T>::load1(x + tail + tid) * inv_t;
      if (REF) zr[0] = Elem<T>::load1(r + tail + tid) * inv_t;
      update<ENT, REF, FULL, 1>(s, z, zr);
    }
    const T* xv = x + pro;
    const T* rv = REF ? r + pro : nullptr;
    int64_t i = tid;
    for (; i + bs < nv; i += 2 * bs) {
      Elem<T>::load_vec(xv + i * VEC, z);
      Elem<T>::load_vec(xv + (i + bs) * VEC, z + VEC);
      if (REF) {
        Elem<T>::load_vec(rv + i * VEC, zr);
        Elem<T>::load_vec(rv + (i + bs) * VEC, zr + VEC);
      }
HK_UNROLL
      for (int k = 0; k < 2 * VEC; ++k) {
        z[k] *= inv_t;
        if (REF) zr[k] *= inv_t;
      }
      update<ENT, REF, FULL, 2 * VEC>(s, z, zr);
    }
    if (i < nv) {
      Elem<T>::load_vec(xv + i * VEC, z);
      if (REF) Elem<T>::load_vec(rv + i * VEC, zr);
HK_UNROLL
      for (int k = 0; k < VEC; ++k) {
        z[k] *= inv_t;
        if (REF) zr[k] *= inv_t;
      }
      update<ENT, REF, FULL, VEC>(s, z, zr);
    }
  } else {
    int64_t c = tid;
    for (; c + 3 * bs < V; c += 4 * bs) {
HK_UNROLL
      for (int k = 0; k < 4; ++k) {
        z[k] = Elem<T>::load1(x + c + k * bs) * inv_t;
        zr[k] = Elem<T>::load1(r + c + k * bs) * inv_t;
      }
      update<ENT, REF, FULL, 4>(s, z, zr);
    }
    for (; c < V; c += bs) {
      z[0] = Elem<T>::load1(x + c) * inv_t;
      zr[0] = Elem<T>::load1(r + c) * inv_t;
      update<ENT, REF, FULL, 1>(s, z, zr);
    }
  }
  return s;
}

// e^d - 1 - d without cancellation (the Triton kernel's series, to d^10/10!, for |d| < 0.5).
HK_HD float k3_estimator(float d) {
  if (fabsf(d) < 0.5f) {
    return d * d * (0.5f + d * (1.f / 6.f + d * (1.f / 24.f + d * (1.f / 120.f + d * (1.f / 720.f + d * (
        1.f / 5040.f + d * (1.f / 40320.f + d * (1.f / 362880.f + d * (1.f / 3628800.f)))))))));
  }
  return expf(d) - 1.f - d;
}

// Per-row outputs from the reduced state. zt / zrt: the target's logits times 1/temperature (ignored when
// !in_range). out = {logp, ref_logp, kl, entropy}; stats = {m, log_s, m_ref, log_s_ref}.
template <bool REF, bool FULL>
HK_HD void finalize_row(const State& s, float zt, float zrt, bool in_range, int kl_mode, float* out, float* stats) {
  const float log_s = logf(s.s);
  const float lp = in_range ? (zt - s.m) - log_s : quiet_nan();
  out[0] = lp;
  out[1] = out[2] = out[3] = 0.f;
  stats[0] = s.m;
  stats[1] = log_s;
  stats[2] = stats[3] = 0.f;
  if (REF) {
    const float log_sr = logf(s.sr);
    out[1] = in_range ? (zrt - s.mr) - log_sr : quiet_nan();
    // d = ref_logp - logp regrouped (as in the Triton kernel) so that huge logits cancel before rounding:
    // with |z| ~ 1e4 each log-prob carries ~1e-3 of fp32 rounding, (z_ref_t - z_t), (m - m_ref) and
    // (log_s - log_sr) do not.
    const float d = in_range ? ((zrt - zt) + (s.m - s.mr)) + (log_s - log_sr) : quiet_nan();
    if (FULL) {
      out[2] = s.c / s.s - log_s + log_sr;
    } else if (kl_mode == 1) {
      out[2] = -d;
    } else if (kl_mode == 2) {
      out[2] = 0.5f * d * d;
    } else {
      out[2] = k3_estimator(d);
    }
    out[3] = log_s - s.a / s.s;
    stats[2] = s.mr;
    stats[3] = log_sr;
  }
}

// ---------------------------------------------------------------------------------------------- backward
// dz_v = p_v (coef0 - gh log p_v + gf (log p_v - log p_ref_v)) + g [v == target], every coefficient already
// multiplied by 1/temperature (dlogits = dz / T).
struct BwdRow {
  float m, log_s, mr, log_sr, coef0, gh, gf, g, inv_t;
};

// grad_*: the row's upstream gradients (0 where absent); lp/rlp/kl/ent: the forward's outputs for the row.
HK_HD BwdRow make_bwd_row(const float* stats, float inv_t, int kl_mode, bool has_gkl, float glogp, float gkl,
                          float gent, float lp, float rlp, float klv, float ent) {
  float g = glogp, gf = 0.f, kf = 0.f;
  if (has_gkl && kl_mode >= 1 && kl_mode <= 3) {
    if (kl_mode == 1) {
      g += gkl;
    } else if (kl_mode == 2) {
      g += gkl * (lp - rlp);
    } else {
      g += gkl * (1.f - expf(rlp - lp));
    }
  }
  if (has_gkl && kl_mode == 4) {
    gf = gkl;
    kf = klv;
  }
  return BwdRow{stats[0], stats[1], stats[2], stats[3], (-g - gent * ent - gf * kf) * inv_t, gent * inv_t,
                gf * inv_t, g * inv_t, inv_t};
}

template <bool NEED_REF>
HK_HD float grad_elem(const BwdRow& c, float zx, float zrx) {
  const float lp = (zx * c.inv_t - c.m) - c.log_s;
  const float p = fast_exp2(lp * kLog2e);
  float inner = fmaf(-c.gh, lp, c.coef0);
  if (NEED_REF) inner = fmaf(c.gf, lp - ((zrx * c.inv_t - c.mr) - c.log_sr), inner);
  return p == 0.f ? 0.f : p * inner;     // p = 0 (logit -inf): exactly 0, never 0·inf; NaN logits stay NaN
}

// Thread `tid`'s share of dlogits for one row, with the same head / vectors / tail split as the forward (by
// the alignment of x, which must match dx's, and r's when it is read); otherwise coalesced scalars.
template <typename T, bool NEED_REF>
HK_HD void thread_row_backward(const T* x, const T* r, T* dx, int64_t V, int64_t tgt, const BwdRow& c, int tid,
                               int bs) {
  constexpr int VEC = Elem<T>::kVec;
  float z[2 * VEC], zr[2 * VEC], o[2 * VEC];
  const bool vec_ok = same_16b_phase(x, dx) && (!NEED_REF || same_16b_phase(x, r));
  if (vec_ok) {
    const int64_t pro = head_len(x, V);
    const int64_t nv = (V - pro) / VEC;
    const int64_t tail = pro + nv * VEC;
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
HK_UNROLL
      for (int k = 0; k < 2 * VEC; ++k) o[k] = grad_elem<NEED_REF>(c, z[k], NEED_REF ? zr[k] : 0.f);
HK_UNROLL
      for (int h = 0; h < 2; ++h) {              // the target column: one compare per vector
        const int64_t off = tgt - (pro + (i + h * bs) * VEC);
        if (off >= 0 && off < VEC) {
HK_UNROLL
          for (int k = 0; k < VEC; ++k) o[h * VEC + k] += k == off ? c.g : 0.f;
        }
      }
      Elem<T>::store_vec(dv + i * VEC, o);
      Elem<T>::store_vec(dv + (i + bs) * VEC, o + VEC);
    }
    if (i < nv) {
      Elem<T>::load_vec(xv + i * VEC, z);
      if (NEED_REF) Elem<T>::load_vec(rv + i * VEC, zr);
HK_UNROLL
      for (int k = 0; k < VEC; ++k) o[k] = grad_elem<NEED_REF>(c, z[k], NEED_REF ? zr[k] : 0.f);
      const int64_t off = tgt - (pro + i * VEC);
      if (off >= 0 && off < VEC) {
HK_UNROLL
        for (int k = 0; k < VEC; ++k) o[k] += k == off ? c.g : 0.f;
      }
      Elem<T>::store_vec(dv + i * VEC, o);
    }
  } else {
    for (int64_t col = tid; col < V; col += bs) {
      const float zrx = NEED_REF ? Elem<T>::load1(r + col) : 0.f;
      const float v = grad_elem<NEED_REF>(c, Elem<T>::load1(x + col), zrx) + (col == tgt ? c.g : 0.f);
      Elem<T>::store1(dx + col, v);
    }
  }
}

// Thread `tid`'s share of zeroing an ignored row.
template <typename T>
HK_HD void thread_zero_row(T* dx, int64_t V, int tid, int bs) {
  constexpr int VEC = Elem<T>::kVec;
  const int64_t pro = head_len(dx, V);
  const int64_t nv = (V - pro) / VEC, tail = pro + nv * VEC;
  float zeros[VEC];
  for (int k = 0; k < VEC; ++k) zeros[k] = 0.f;
  if (tid < pro) Elem<T>::store1(dx + tid, 0.f);
  if (tid < V - tail) Elem<T>::store1(dx + tail + tid, 0.f);
  for (int64_t i = tid; i < nv; i += bs) Elem<T>::store_vec(dx + pro + i * VEC, zeros);
}

}  // namespace lp
}  // namespace hydra
