// The false-negative filter pass of the CPU log-sum-exp kernels (RowFilter, row_filter.h): run on
// a raw score tile right after its GEMM and the id mask (Problem::mask_tile), it writes -inf over
// the dropped candidates, so that every later pass (max, exp sums, gradient weights, column
// statistics) treats them as masked: no contribution to the lse, zero probability in the
// backward. The thresholds are per query and computed on the host in O(N D); the guide scores of
// the tile come from one more GEMM into a temporary of the tile's size, never stored beyond it.
//
// Layout as everywhere in infonce.cpp: tile (C keys x R queries), s_ij = x[j][i] alpha_i beta_j.
// The variants (threshold, guide, counting) are template flags, so the inner loop carries no
// branch; the positive is restored after the loop (one entry per query), not tested per element.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "cpu/infonce.h"
#include "cpu/lse_math.h"
#include "cpu/sided_filter.h"

namespace fastcontrast {
namespace tiles {

template <typename T, bool kThreshold, bool kGuide, bool kCount>
void drop_candidates(T* x, const T* gx, int64_t m, int64_t rows, const T* a, const T* beta,
                     const T* thr, const T* gthr, int64_t* count) {
  for (int64_t j = 0; j < m; ++j) {
    T* xr = x + j * rows;
    const T* gr = kGuide ? gx + j * rows : nullptr;
    const T b = beta[j];
#pragma omp simd
    for (int64_t i = 0; i < rows; ++i) {
      const T v = xr[i];
      bool drop = false;
      if constexpr (kThreshold) drop = v * a[i] * b > thr[i];  // the later passes' s, same bits
      if constexpr (kGuide) drop = drop || gr[i] > gthr[i];
      drop = drop && v != -kInf<T>;  // an id-masked entry is no candidate: not counted
      xr[i] = drop ? -kInf<T> : v;
      if constexpr (kCount) count[i] += drop ? 1 : 0;
    }
  }
}

// Applies RowFilter f to the tile of queries r0 .. r0 + rows (alpha, beta: the problem's scales);
// with a column rule, filter_tile_symmetric (sided_filter.h).
template <typename T>
void filter_tile(const RowFilter& f, int64_t r0, int64_t rows, at::Tensor& tile, const T* alpha,
                 const T* beta) {
  if (f.symmetric()) {  // the row and the column rule apart (sided_filter.h)
    filter_tile_symmetric<T>(f, r0, rows, tile, alpha, beta);
    return;
  }
  const int64_t m = tile.size(0);
  if (m == 0 || rows == 0) return;
  T* x = tile.data_ptr<T>();
  // The positive's entry of each query whose positive lies in this tile, kept to restore.
  std::vector<int64_t> local(rows, -1);
  std::vector<T> saved(rows);
  if (f.positive_col) {
    const int64_t* pos = f.positive_col->data_ptr<int64_t>() + r0;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t p = pos[i] - f.col_offset;
      if (p >= 0 && p < m) {
        local[i] = p;
        saved[i] = x[p * rows + i];
      }
    }
  }
  at::Tensor guide_tile;  // (m, rows) guide scores of this tile only
  const T* gx = nullptr;
  if (f.guide_q) {
    guide_tile = at::mm(*f.guide_keys, f.guide_q->narrow(0, r0, rows).t()).contiguous();
    gx = guide_tile.data_ptr<T>();
  }
  const T* a = alpha + r0;
  const T* thr = f.threshold ? f.threshold->data_ptr<T>() + r0 : nullptr;
  const T* gthr = f.guide_threshold ? f.guide_threshold->data_ptr<T>() + r0 : nullptr;
  int64_t* count = f.dropped ? f.dropped->data_ptr<int64_t>() + r0 : nullptr;
  const auto run = [&](auto threshold, auto guide) {
    constexpr bool kT = decltype(threshold)::value, kG = decltype(guide)::value;
    if (count)
      drop_candidates<T, kT, kG, true>(x, gx, m, rows, a, beta, thr, gthr, count);
    else
      drop_candidates<T, kT, kG, false>(x, gx, m, rows, a, beta, thr, gthr, count);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  if (thr && gx) run(Yes{}, Yes{});
  else if (thr) run(Yes{}, No{});
  else if (gx) run(No{}, Yes{});
  for (int64_t i = 0; i < rows; ++i) {
    if (local[i] < 0) continue;
    T& e = x[local[i] * rows + i];
    if (e == -kInf<T> && saved[i] != -kInf<T>) {  // the positive is never dropped
      e = saved[i];
      if (count) count[i] -= 1;
    }
  }
}

}  // namespace tiles
}  // namespace fastcontrast
