// The tile geometry of the tiled masked log-sum-exp kernels on CPU (infonce.cpp, gram.cpp): the
// bytes one score tile may take, the query rows of a block and the keys of a chunk.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastcontrast {
namespace tiles {

// Tile budget of the gradient kernels: at least kMinTileBytes, or half the size of q and keys
// together when that is larger (dq and dkeys alone take that much, so the tile stays a fraction of
// the memory the call needs anyway, while large problems get the taller tiles that keep the GEMMs
// efficient). The forward alone returns only O(N + M) values, and the symmetric (column-term)
// backward is not the memory-critical fused path: their tiles may be twice as large.
constexpr int64_t kMinTileBytes = int64_t(16) << 20;
constexpr int64_t kMinBlockRows = 32;
constexpr int64_t kMaxBlockRows = 512;
constexpr int64_t kElemsPerTask = 16384;  // parallel grain of the elementwise passes

// R: the tile budget over the size of one query's column, in [kMinBlockRows, kMaxBlockRows], a
// multiple of 16 (GEMM-friendly), never more than N. Measured on N = M = 16384, D = 256 fp32
// (2 cores): the three GEMMs run at ~100 / 120 / 130 GFLOP/s for R = 128 / 256 / 512 and the
// elementwise passes add a few percent; R = 256 there (16 MiB tile), 512 for the forward alone.
inline int64_t tile_budget(int64_t n, int64_t m, int64_t d, int64_t elem_size, bool large_tile) {
  const int64_t budget = std::max(kMinTileBytes, (n + m) * d * elem_size / 2);
  return large_tile ? 2 * budget : budget;
}

inline int64_t choose_block_rows(int64_t n, int64_t m, int64_t d, int64_t elem_size,
                                 bool large_tile, int64_t requested) {
  int64_t b = requested;
  if (b <= 0) {
    b = tile_budget(n, m, d, elem_size, large_tile) / std::max<int64_t>(m * elem_size, 1);
    b = std::clamp<int64_t>(b / 16 * 16, kMinBlockRows, kMaxBlockRows);
  }
  return std::max<int64_t>(1, std::min(b, n));
}

// Keys per chunk of the chunked kernels (gram.cpp, the backward of infonce.cpp): a tile of
// R x C of about kChunkBytes stays in cache from its GEMM through the elementwise passes to the
// gradient GEMMs (a whole M x R tile did not: at M = 16384 its GEMMs ran at ~65% of the
// 512 x 1024 rate on 2 threads). A forced block size (tests) gets chunks of 3 blocks, so that
// chunk boundaries fall inside the key range.
constexpr int64_t kChunkBytes = int64_t(2) << 20;

inline int64_t chunk_keys(int64_t rows, int64_t elem_size, int64_t requested) {
  if (requested > 0) return 3 * rows;
  return std::max<int64_t>(rows, kChunkBytes / (rows * elem_size) / 16 * 16);
}

}  // namespace tiles
}  // namespace fastcontrast
