// Replays csrc/logprobs.cu's blocks on the CPU, thread by thread, with the kernels' own row code
// (csrc/logprobs_row.cuh, compiled for the host): used by tests/kernels/test_cuda_compile.py.
//
// usage: logprobs_host <dir> dtype kl_mode rows V stride_x off_x stride_r off_r threads temperature
//                      has_glogp has_gkl has_gent ignore_index
// reads  <dir>/in.bin : x buffer (off_x + rows*stride_x elements of dtype), r buffer (same with off_r/stride_r;
//                       present iff kl_mode != 0), targets int64[rows], grad_logp/grad_kl/grad_entropy fp32[rows]
//                       (those flagged present)
// writes <dir>/out.bin: logp, ref_logp, kl, entropy fp32[rows] each, stats fp32[rows*4], dlogits fp32[rows*V]
//                       (computed in dtype, widened to fp32)
// The block reduction is the kernel's: a butterfly (xor 16, 8, 4, 2, 1) inside each warp, then warp 0 does the
// same over the per-warp states.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "logprobs_row.cuh"

using namespace hydra::lp;

template <bool ENT, bool REF, bool FULL>
static State block_reduce_host(std::vector<State> s) {
  const int bs = static_cast<int>(s.size()), nw = bs / 32;
  auto butterfly = [](State* lanes) {
    for (int off = 16; off > 0; off >>= 1) {
      State nxt[32];
      for (int l = 0; l < 32; ++l) nxt[l] = merge<ENT, REF, FULL>(lanes[l], lanes[l ^ off]);
      for (int l = 0; l < 32; ++l) lanes[l] = nxt[l];
    }
  };
  std::vector<State> per_warp(nw);
  for (int w = 0; w < nw; ++w) {
    butterfly(&s[w * 32]);
    per_warp[w] = s[w * 32];
  }
  State lanes[32];
  for (int l = 0; l < 32; ++l) lanes[l] = l < nw ? per_warp[l] : empty_state();
  butterfly(lanes);
  return lanes[0];
}

template <typename T>
static float widen(const T& v);
template <>
float widen<float>(const float& v) { return v; }
template <>
float widen<__nv_bfloat16>(const __nv_bfloat16& v) { return Elem<__nv_bfloat16>::load1(&v); }
template <>
float widen<__half>(const __half& v) { return Elem<__half>::load1(&v); }

template <typename T, bool REF, bool FULL>
static int run(const char* dir, int kl_mode, int64_t rows, int64_t V, int64_t sx, int64_t ox, int64_t sr, int64_t orr,
               int bs, double temperature, bool has_glogp, bool has_gkl, bool has_gent, int64_t ignore_index) {
  constexpr bool ENT = REF;
  const size_t nx = static_cast<size_t>(ox + rows * sx), nr = REF ? static_cast<size_t>(orr + rows * sr) : 0;
  // 64-byte aligned buffers, so that off_x / off_r alone decide the 16-byte phases, as on the device.
  std::vector<T> xb(nx + 64 / sizeof(T)), rb(nr + 64 / sizeof(T));
  T* xbase = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(xb.data()) + 63) & ~uintptr_t(63));
  T* rbase = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(rb.data()) + 63) & ~uintptr_t(63));
  std::vector<int64_t> tg(rows);
  std::vector<float> glogp(rows, 0.f), gkl(rows, 0.f), gent(rows, 0.f);
  char path[4096];
  std::snprintf(path, sizeof(path), "%s/in.bin", dir);
  FILE* f = std::fopen(path, "rb");
  if (!f) return 2;
  bool ok = std::fread(xbase, sizeof(T), nx, f) == nx;
  if (REF) ok = ok && std::fread(rbase, sizeof(T), nr, f) == nr;
  ok = ok && std::fread(tg.data(), 8, rows, f) == static_cast<size_t>(rows);
  if (has_glogp) ok = ok && std::fread(glogp.data(), 4, rows, f) == static_cast<size_t>(rows);
  if (has_gkl) ok = ok && std::fread(gkl.data(), 4, rows, f) == static_cast<size_t>(rows);
  if (has_gent) ok = ok && std::fread(gent.data(), 4, rows, f) == static_cast<size_t>(rows);
  std::fclose(f);
  if (!ok) return 3;

  const float inv_t = static_cast<float>(1.0 / temperature);   // as the binding rounds it
  std::vector<float> out(4 * rows), stats(4 * rows), dxf(rows * V);
  std::vector<T> dxb(rows * V + 64 / sizeof(T));
  T* dx = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(dxb.data()) + 63) & ~uintptr_t(63));
  for (int64_t row = 0; row < rows; ++row) {
    const T* x = xbase + ox + row * sx;
    const T* r = REF ? rbase + orr + row * sr : nullptr;
    const int64_t tgt = tg[row];
    float o[4] = {0.f, 0.f, 0.f, 0.f}, st[4] = {0.f, 0.f, 0.f, 0.f};
    if (tgt != ignore_index) {
      const bool in_range = tgt >= 0 && tgt < V;
      const float zt = in_range ? Elem<T>::load1(x + tgt) * inv_t : 0.f;
      const float zrt = (REF && in_range) ? Elem<T>::load1(r + tgt) * inv_t : 0.f;
      std::vector<State> states(bs);
      for (int tid = 0; tid < bs; ++tid) states[tid] = thread_row_forward<T, ENT, REF, FULL>(x, r, V, inv_t, tid, bs);
      const State s = block_reduce_host<ENT, REF, FULL>(states);
      finalize_row<REF, FULL>(s, zt, zrt, in_range, kl_mode, o, st);
    }
    for (int k = 0; k < 4; ++k) {
      out[k * rows + row] = o[k];
      stats[row * 4 + k] = st[k];
    }
    T* d = dx + row * V;
    if (tgt == ignore_index) {
      for (int tid = 0; tid < bs; ++tid) thread_zero_row(d, V, tid, bs);
      continue;
    }
    const bool sampled = has_gkl && kl_mode >= 1 && kl_mode <= 3;
    const bool need_ref = has_gkl && kl_mode == 4;
    const BwdRow c = make_bwd_row(st, inv_t, kl_mode, has_gkl, glogp[row], gkl[row], gent[row], sampled ? o[0] : 0.f,
                                  sampled ? o[1] : 0.f, need_ref ? o[2] : 0.f, has_gent ? o[3] : 0.f);
    for (int tid = 0; tid < bs; ++tid) {
      if (need_ref) {
        thread_row_backward<T, true>(x, r, d, V, tgt, c, tid, bs);
      } else {
        thread_row_backward<T, false>(x, r, d, V, tgt, c, tid, bs);
      }
    }
  }
  for (int64_t i = 0; i < rows * V; ++i) dxf[i] = widen<T>(dx[i]);
  std::snprintf(path, sizeof(path), "%s/out.bin", dir);
  f = std::fopen(path, "wb");
  if (!f) return 4;
  std::fwrite(out.data(), 4, out.size(), f);
  std::fwrite(stats.data(), 4, stats.size(), f);
  std::fwrite(dxf.data(), 4, dxf.size(), f);
  std::fclose(f);
  return 0;
}

template <typename T>
static int dispatch(const char* dir, int kl_mode, int64_t rows, int64_t V, int64_t sx, int64_t ox, int64_t sr,
                    int64_t orr, int bs, double temp, bool hg, bool hk, bool he, int64_t ign) {
  if (kl_mode == 0) return run<T, false, false>(dir, kl_mode, rows, V, sx, ox, sr, orr, bs, temp, hg, hk, he, ign);
  if (kl_mode == 4) return run<T, true, true>(dir, kl_mode, rows, V, sx, ox, sr, orr, bs, temp, hg, hk, he, ign);
  return run<T, true, false>(dir, kl_mode, rows, V, sx, ox, sr, orr, bs, temp, hg, hk, he, ign);
}

int main(int argc, char** argv) {
  if (argc != 16) {
    std::fprintf(stderr, "usage: see the header of logprobs_host.cpp\n");
    return 1;
  }
  const char* dir = argv[1];
  const int dtype = std::atoi(argv[2]), kl_mode = std::atoi(argv[3]);
  const int64_t rows = std::atoll(argv[4]), V = std::atoll(argv[5]), sx = std::atoll(argv[6]),
                ox = std::atoll(argv[7]), sr = std::atoll(argv[8]), orr = std::atoll(argv[9]);
  const int bs = std::atoi(argv[10]);
  const double temp = std::atof(argv[11]);
  const bool hg = std::atoi(argv[12]) != 0, hk = std::atoi(argv[13]) != 0, he = std::atoi(argv[14]) != 0;
  const int64_t ign = std::atoll(argv[15]);
  if (bs < 32 || bs % 32 != 0) return 1;
  switch (dtype) {
    case 0: return dispatch<float>(dir, kl_mode, rows, V, sx, ox, sr, orr, bs, temp, hg, hk, he, ign);
    case 1: return dispatch<__nv_bfloat16>(dir, kl_mode, rows, V, sx, ox, sr, orr, bs, temp, hg, hk, he, ign);
    case 2: return dispatch<__half>(dir, kl_mode, rows, V, sx, ox, sr, orr, bs, temp, hg, hk, he, ign);
    default: return 1;
  }
}
