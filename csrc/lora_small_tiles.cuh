// Tile geometry of csrc/lora_linear_small.cu: shared-memory layout, and which address each lane hands to
// ldmatrix and which (feature, row) each accumulator element holds.
//
// Host + device: the kernel computes every shared-memory address and every output coordinate with these
// functions, and tests/kernels/test_cuda_compile.py builds them for the host and runs them against an emulation
// of ldmatrix and mma.m16n8k16 written from the PTX ISA (independently of this file), so the fragment mapping is
// checked on machines without a GPU.
//
// Roles (yᵀ = W·xᵀ): W rows (output features) are the 16-row "A" operand, rows of x the 8-column "B" operand.
// Block: kWarpsM × kWarpsN warps; warp (wm, wn) owns features [wm·16·MI, +16·MI) and x rows [wn·8·NI, +8·NI).
// Pipeline tiles are [rows][64] 16-bit values, 128 bytes per row, 16-byte chunks XOR-swizzled by (row & 7) so
// that ldmatrix's 8 row addresses of one 8x8 matrix fall in 8 different bank groups.
#pragma once

#if defined(__CUDACC__)
#define HK_TILE_HD __host__ __device__ __forceinline__
#else
#define HK_TILE_HD inline
#endif

namespace hydra {
namespace lora {

constexpr int kBK = 64;                              // K per pipeline stage: 128 bytes per row of a tile
constexpr int kStages = 4;
constexpr int kWarpsM = 4;                           // warps along the output features
constexpr int kWarpsN = 2;                           // warps along the rows of x
constexpr int kThreads = 32 * kWarpsM * kWarpsN;     // 256

HK_TILE_HD constexpr int block_n_of(int mw) { return 16 * mw * kWarpsM; }
HK_TILE_HD constexpr int rows_block_of(int ni) { return 8 * ni * kWarpsN; }
HK_TILE_HD int round_up(int v, int m) { return (v + m - 1) / m * m; }

// Byte offset of 16-byte chunk `ch` (0..7) of row `row` in a swizzled pipeline tile.
HK_TILE_HD int swz(int row, int ch) { return row * 128 + ((ch ^ (row & 7)) << 4); }

// ldmatrix.x4 address (byte offset in the W tile) of `lane` for the A fragment of the warp's 16-row tile `mi`
// at k16 step `kk`: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
// = registers a0..a3 of mma.m16n8k16.
HK_TILE_HD int a_ldm_offset(int wm, int mi, int MI, int kk, int lane) {
  return swz(wm * 16 * MI + mi * 16 + (lane & 15), kk * 2 + (lane >> 4));
}

// ldmatrix.x4 address (byte offset in the x tile) for two 8-row groups ni, ni+1 of x at k16 step kk:
// registers (b0, b1) of group ni, then (b0, b1) of group ni+1.
HK_TILE_HD int b_ldm_offset_x4(int wn, int ni, int NI, int kk, int lane) {
  return swz(wn * 8 * NI + ni * 8 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1));
}

// ldmatrix.x2 address for one 8-row group (lanes 16-31 repeat lanes 0-15: their addresses are ignored).
HK_TILE_HD int b_ldm_offset_x2(int wn, int ni, int NI, int kk, int lane) {
  return swz(wn * 8 * NI + ni * 8 + (lane & 7), kk * 2 + ((lane >> 3) & 1));
}

// Block-local (feature, x row) of accumulator element e (0..3) of `lane` in the warp's tile (mi, ni):
// c0, c1 -> feature g, rows 2q, 2q+1; c2, c3 -> feature g+8 (g = lane / 4, q = lane % 4).
HK_TILE_HD int acc_feature(int wm, int mi, int MI, int lane, int e) { return wm * 16 * MI + mi * 16 + (lane >> 2) + 8 * (e >> 1); }
HK_TILE_HD int acc_row(int wn, int ni, int NI, int lane, int e) { return wn * 8 * NI + ni * 8 + 2 * (lane & 3) + (e & 1); }

// The x row a lane's B fragment (column n = lane / 4 of the 16x8 operand) belongs to.
HK_TILE_HD int b_frag_row(int wn, int ni, int NI, int lane) { return wn * 8 * NI + ni * 8 + (lane >> 2); }

// Epilogue tiles ([rows][rank_pad] 16-bit, for the LoRA expand) use a padded pitch instead of a swizzle:
// rank_pad + 8 elements, i.e. an odd number of 16-byte units, so 8 consecutive rows hit distinct banks.
HK_TILE_HD int rank_pitch(int rank_pad) { return rank_pad + 8; }

// Byte offset of element (row, col) of a padded epilogue tile.
HK_TILE_HD int pad_offset(int row, int col, int pitch) { return (row * pitch + col) * 2; }

// ldmatrix.x4 address (byte offset in a padded B[a] slice [BN][pitch]) for the expand's A fragment.
HK_TILE_HD int a_ldm_offset_padded(int wm, int mi, int MI, int kk, int lane, int pitch) {
  return pad_offset(wm * 16 * MI + mi * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8, pitch);
}

// ldmatrix.x2 address (byte offset in a padded xa tile [RB][pitch]) for the expand's B fragment.
HK_TILE_HD int b_ldm_offset_padded_x2(int wn, int ni, int NI, int kk, int lane, int pitch) {
  return pad_offset(wn * 8 * NI + ni * 8 + (lane & 7), kk * 16 + ((lane >> 3) & 1) * 8, pitch);
}

// Shared memory per block, in bytes: the pipeline (reused by the epilogue's xa hi/lo tiles and the output
// staging tile once drained) and, after it, the prefetched B[a] slices of the used adapters.
struct Layout {
  int stage_bytes, pipe_bytes, epi_bytes, region_bytes, bpre_bytes, total_bytes, rank_pad;
};

HK_TILE_HD Layout make_layout(int bn, int rb, int rank, int n_used) {
  Layout l;
  l.rank_pad = round_up(rank > 0 ? rank : 1, 16);
  l.stage_bytes = (bn + rb) * kBK * 2;                                        // W tile, then x tile
  l.pipe_bytes = kStages * l.stage_bytes;
  const int xhl = n_used > 0 ? 2 * rb * rank_pitch(l.rank_pad) * 2 : 0;     // xa hi/lo tiles
  l.epi_bytes = xhl + rb * (bn + 8) * 2;                                      // + output staging tile
  l.region_bytes = round_up(l.pipe_bytes > l.epi_bytes ? l.pipe_bytes : l.epi_bytes, 128);
  l.bpre_bytes = n_used * bn * rank_pitch(l.rank_pad) * 2;
  l.total_bytes = l.region_bytes + l.bpre_bytes;
  return l;
}

}  // namespace lora
}  // namespace hydra
