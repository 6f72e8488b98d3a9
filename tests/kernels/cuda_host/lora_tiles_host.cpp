// Checks the fragment mapping of csrc/lora_linear_small.cu on the CPU: the kernel's own address/coordinate
// functions (csrc/lora_small_tiles.cuh) driven through an emulation of ldmatrix and mma.m16n8k16 written from the
// PTX ISA (below, independent of that header). Used by tests/kernels/test_cuda_compile.py.
//
// For every block configuration (MI = block_m_warps in {1, 2}, NI in {1, 2, 4, 8}) it
//  * stores a random W tile [BN][64] and x tile [RB][64] into "shared memory" at the kernel's swizzled offsets,
//    replays each warp's k16 steps exactly as compute_stage does, and compares every accumulator element, at the
//    (feature, row) the kernel writes it to, with the dot product W[feature]·x[row];
//  * does the same for the LoRA expand (padded B[a] slice and xa tiles, rank_pad 16..128, per-row adapter mask);
//  * checks that every ldmatrix phase (8 row addresses of one 8x8 matrix) hits 8 distinct 16-byte bank groups.
// Prints "OK" and exits 0, or prints the first mismatches and exits 1.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "lora_small_tiles.cuh"

using namespace hydra::lora;

namespace {

// ------------------------------------------------------------------------- PTX emulation (from the ISA)
uint16_t f2bf(float f) {                 // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
float bf2f(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t load16(const std::vector<uint8_t>& smem, int byte) {
  uint16_t v;
  std::memcpy(&v, &smem[byte], 2);
  return v;
}

int bank_conflicts = 0;

// ldmatrix.sync.aligned.m8n8.x{nmat}.shared.b16: lanes 8m..8m+7 give the 8 row addresses of matrix m; lane L
// receives, for each matrix m, row L/4 elements 2(L%4), 2(L%4)+1 packed in register m (low half first).
void ldmatrix(const std::vector<uint8_t>& smem, const int addr[32], int nmat, uint32_t out[32][4]) {
  for (int m = 0; m < nmat; ++m) {
    bool used[8] = {};
    for (int j = 0; j < 8; ++j) {
      const int a = addr[m * 8 + j];
      if (a % 16 != 0) {
        std::printf("unaligned ldmatrix row address %d\n", a);
        std::exit(1);
      }
      const int group = (a / 16) % 8;    // 128-byte bank window: a conflict-free phase uses 8 distinct 16 B groups
      if (used[group]) ++bank_conflicts;
      used[group] = true;
    }
    for (int L = 0; L < 32; ++L) {
      const int row_addr = addr[m * 8 + L / 4];
      const uint16_t lo = load16(smem, row_addr + 2 * (2 * (L % 4)));
      const uint16_t hi = load16(smem, row_addr + 2 * (2 * (L % 4) + 1));
      out[L][m] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
    }
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32, fragment layouts from the PTX ISA:
//  A (16x16): reg i of lane (g = L/4, q = L%4) holds rows {g, g+8, g, g+8}[i], cols 2q + {0,1} + {0,0,8,8}[i];
//  B (16x8):  reg i holds k = 2q + {0,1} + 8i, n = g;   C/D: element i -> row g + 8(i/2), col 2q + i%2.
void mma(const uint32_t a[32][4], const uint32_t b[32][2], float c[32][4]) {
  float A[16][16], B[16][8];
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, q = L % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + ((i & 1) ? 8 : 0), col = 2 * q + ((i & 2) ? 8 : 0);
      A[row][col] = bf2f(static_cast<uint16_t>(a[L][i] & 0xffffu));
      A[row][col + 1] = bf2f(static_cast<uint16_t>(a[L][i] >> 16));
    }
    for (int i = 0; i < 2; ++i) {
      const int k = 2 * q + 8 * i;
      B[k][g] = bf2f(static_cast<uint16_t>(b[L][i] & 0xffffu));
      B[k + 1][g] = bf2f(static_cast<uint16_t>(b[L][i] >> 16));
    }
  }
  for (int L = 0; L < 32; ++L) {
    const int g = L / 4, q = L % 4;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * q + i % 2;
      double s = c[L][i];
      for (int k = 0; k < 16; ++k) s += static_cast<double>(A[row][k]) * B[k][col];
      c[L][i] = static_cast<float>(s);
    }
  }
}

int failures = 0;
void check(bool ok, const char* what, int a, int b, int c, double got, double want) {
  if (!ok && failures++ < 10) std::printf("MISMATCH %s (%d, %d, %d): got %g want %g\n", what, a, b, c, got, want);
}

// ----------------------------------------------------------------------------------- main-loop mapping
void check_main(int MI, int NI, std::mt19937& rng) {
  const int BN = block_n_of(MI), RB = rows_block_of(NI);
  std::normal_distribution<float> nd;
  std::vector<float> W(BN * kBK), X(RB * kBK);
  for (auto& v : W) v = bf2f(f2bf(nd(rng)));
  for (auto& v : X) v = bf2f(f2bf(nd(rng)));
  // one pipeline stage, stored the way load_stage's cp.async does: chunk (row, ch) -> tile base + swz(row, ch)
  const int x_base = BN * kBK * 2;
  std::vector<uint8_t> smem((BN + RB) * kBK * 2);
  for (int row = 0; row < BN; ++row)
    for (int ch = 0; ch < 8; ++ch)
      for (int e = 0; e < 8; ++e) {
        const uint16_t h = f2bf(W[row * kBK + ch * 8 + e]);
        std::memcpy(&smem[swz(row, ch) + 2 * e], &h, 2);
      }
  for (int row = 0; row < RB; ++row)
    for (int ch = 0; ch < 8; ++ch)
      for (int e = 0; e < 8; ++e) {
        const uint16_t h = f2bf(X[row * kBK + ch * 8 + e]);
        std::memcpy(&smem[x_base + swz(row, ch) + 2 * e], &h, 2);
      }
  for (int wm = 0; wm < kWarpsM; ++wm)
    for (int wn = 0; wn < kWarpsN; ++wn) {
      std::vector<float> acc(MI * NI * 32 * 4, 0.f);
      auto accp = [&](int mi, int ni) { return reinterpret_cast<float(*)[4]>(&acc[(mi * NI + ni) * 128]); };
      for (int kk = 0; kk < kBK / 16; ++kk) {   // as compute_stage
        std::vector<uint32_t> a(MI * 32 * 4), b(NI * 32 * 2);
        auto ap = [&](int mi) { return reinterpret_cast<uint32_t(*)[4]>(&a[mi * 128]); };
        auto bp = [&](int ni) { return reinterpret_cast<uint32_t(*)[2]>(&b[ni * 64]); };
        int addr[32];
        uint32_t t4[32][4];
        for (int mi = 0; mi < MI; ++mi) {
          for (int L = 0; L < 32; ++L) addr[L] = a_ldm_offset(wm, mi, MI, kk, L);
          ldmatrix(smem, addr, 4, ap(mi));
        }
        for (int ni = 0; ni < NI; ni += 2) {
          if (ni + 1 < NI) {
            for (int L = 0; L < 32; ++L) addr[L] = x_base + b_ldm_offset_x4(wn, ni, NI, kk, L);
            ldmatrix(smem, addr, 4, t4);
            for (int L = 0; L < 32; ++L) {
              bp(ni)[L][0] = t4[L][0];
              bp(ni)[L][1] = t4[L][1];
              bp(ni + 1)[L][0] = t4[L][2];
              bp(ni + 1)[L][1] = t4[L][3];
            }
          } else {
            for (int L = 0; L < 32; ++L) addr[L] = x_base + b_ldm_offset_x2(wn, ni, NI, kk, L);
            ldmatrix(smem, addr, 2, t4);
            for (int L = 0; L < 32; ++L) {
              bp(ni)[L][0] = t4[L][0];
              bp(ni)[L][1] = t4[L][1];
            }
          }
        }
        for (int mi = 0; mi < MI; ++mi)
          for (int ni = 0; ni < NI; ++ni) mma(ap(mi), bp(ni), accp(mi, ni));
      }
      for (int mi = 0; mi < MI; ++mi)
        for (int ni = 0; ni < NI; ++ni)
          for (int L = 0; L < 32; ++L)
            for (int e = 0; e < 4; ++e) {
              const int f = acc_feature(wm, mi, MI, L, e), r = acc_row(wn, ni, NI, L, e);
              double want = 0;
              for (int k = 0; k < kBK; ++k) want += static_cast<double>(W[f * kBK + k]) * X[r * kBK + k];
              const double got = accp(mi, ni)[L][e];
              check(std::fabs(got - want) <= 1e-4 * (1 + std::fabs(want)), "main", MI, NI, f * 1000 + r, got, want);
            }
    }
}

// ------------------------------------------------------------------------------------ expand mapping
void check_expand(int MI, int NI, int rank_pad, std::mt19937& rng) {
  const int BN = block_n_of(MI), RB = rows_block_of(NI), pitch = rank_pitch(rank_pad);
  std::normal_distribution<float> nd;
  std::vector<float> Bs(BN * rank_pad), XA(RB * rank_pad);
  for (auto& v : Bs) v = bf2f(f2bf(nd(rng)));
  for (auto& v : XA) v = bf2f(f2bf(nd(rng)));
  const int xa_base = BN * pitch * 2;
  std::vector<uint8_t> smem((BN + RB) * pitch * 2);
  for (int i = 0; i < BN; ++i)
    for (int t = 0; t < rank_pad; ++t) {
      const uint16_t h = f2bf(Bs[i * rank_pad + t]);
      std::memcpy(&smem[pad_offset(i, t, pitch)], &h, 2);
    }
  for (int j = 0; j < RB; ++j)
    for (int t = 0; t < rank_pad; ++t) {
      const uint16_t h = f2bf(XA[j * rank_pad + t]);
      std::memcpy(&smem[xa_base + pad_offset(j, t, pitch)], &h, 2);
    }
  auto masked = [](int row) { return row % 3 == 1; };   // rows of another adapter: their fragments are zeroed
  for (int wm = 0; wm < kWarpsM; ++wm)
    for (int wn = 0; wn < kWarpsN; ++wn) {
      std::vector<float> acc(MI * NI * 32 * 4, 0.f);
      auto accp = [&](int mi, int ni) { return reinterpret_cast<float(*)[4]>(&acc[(mi * NI + ni) * 128]); };
      for (int kk = 0; kk < rank_pad / 16; ++kk) {
        std::vector<uint32_t> a(MI * 32 * 4);
        auto ap = [&](int mi) { return reinterpret_cast<uint32_t(*)[4]>(&a[mi * 128]); };
        int addr[32];
        for (int mi = 0; mi < MI; ++mi) {
          for (int L = 0; L < 32; ++L) addr[L] = a_ldm_offset_padded(wm, mi, MI, kk, L, pitch);
          ldmatrix(smem, addr, 4, ap(mi));
        }
        for (int ni = 0; ni < NI; ++ni) {
          uint32_t t4[32][4], bb[32][2];
          for (int L = 0; L < 32; ++L) addr[L] = xa_base + b_ldm_offset_padded_x2(wn, ni, NI, kk, L, pitch);
          ldmatrix(smem, addr, 2, t4);
          for (int L = 0; L < 32; ++L) {
            const bool mine = !masked(b_frag_row(wn, ni, NI, L));
            bb[L][0] = mine ? t4[L][0] : 0u;
            bb[L][1] = mine ? t4[L][1] : 0u;
          }
          for (int mi = 0; mi < MI; ++mi) mma(ap(mi), bb, accp(mi, ni));
        }
      }
      for (int mi = 0; mi < MI; ++mi)
        for (int ni = 0; ni < NI; ++ni)
          for (int L = 0; L < 32; ++L)
            for (int e = 0; e < 4; ++e) {
              const int f = acc_feature(wm, mi, MI, L, e), r = acc_row(wn, ni, NI, L, e);
              double want = 0;
              if (!masked(r))
                for (int t = 0; t < rank_pad; ++t) want += static_cast<double>(Bs[f * rank_pad + t]) * XA[r * rank_pad + t];
              const double got = accp(mi, ni)[L][e];
              check(std::fabs(got - want) <= 1e-4 * (1 + std::fabs(want)), "expand", MI, NI, f * 1000 + r, got, want);
            }
    }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  for (int MI : {1, 2})
    for (int NI : {1, 2, 4, 8}) {
      check_main(MI, NI, rng);
      for (int rank_pad : {16, 32, 48, 64, 128}) check_expand(MI, NI, rank_pad, rng);
    }
  // Layout: the regions do not overlap and everything the epilogue stages fits where the code puts it.
  for (int MI : {1, 2})
    for (int NI : {1, 2, 4, 8})
      for (int rank : {0, 4, 16, 64, 128})
        for (int used : {0, 1, 3}) {
          const Layout l = make_layout(block_n_of(MI), rows_block_of(NI), rank, used);
          const int pitch = rank_pitch(l.rank_pad), RB = rows_block_of(NI), BN = block_n_of(MI);
          const int xhl = used ? 2 * RB * pitch * 2 : 0;
          check(xhl + RB * (BN + 8) * 2 <= l.region_bytes && l.pipe_bytes <= l.region_bytes &&
                    l.region_bytes % 128 == 0 && l.total_bytes == l.region_bytes + used * BN * pitch * 2,
                "layout", MI, NI, rank, l.total_bytes, 0);
        }
  if (bank_conflicts) std::printf("%d ldmatrix phases with bank conflicts\n", bank_conflicts);
  if (failures || bank_conflicts) return 1;
  std::printf("OK\n");
  return 0;
}
