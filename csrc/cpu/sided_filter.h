// The false-negative filter of a symmetric loss in one pass on CPU (RowFilter with the column rule,
// row_filter.h): each raw score tile is computed once, and entry (i, j) is dropped from row i's
// log-sum-exp by row i's thresholds and from column j's by column j's. An entry that both drop is
// written -inf in the tile, as the one-directional filter does (false_negatives.h); an entry that
// only one direction drops is ALSO written -inf, so that the unchanged passes that follow see the
// union of the drops, and is then given back to the direction that keeps it:
//   forward:  merged into a per-row (per-column) online log-sum-exp (SidedLse), folded into the
//             row (column) lse with logaddexp at the end: no subtraction, no cancellation;
//   backward: its gradient weight written over the tile entry after the weight pass
//             (sided_entries, fix_sided_weights): W_ji = beta_j g_i exp(s_ij - row_lse_i) where
//             the row keeps it, beta_j c_j exp(s_ij - col_lse_j) where the column keeps it.
// False negatives are few, so the entries given back are few; their cost is a scalar pass over
// the tile rows that have any (one vectorised pass decides every entry's two drops).
//
// Exclusive access: the tiles of a query block (of a key chunk) run one at a time (grid_tiles.h),
// so a tile's rows' and columns' counts and accumulators are written by one task at a time.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/lse_math.h"
#include "cpu/row_filter.h"

namespace fastcontrast {

// Online log-sum-exp (max, sum) per row and per column of the entries that only one direction
// keeps (double: the few entries given back cost nothing).
struct SidedLse {
  std::vector<double> row_max, row_sum, col_max, col_sum;
  SidedLse(int64_t n, int64_t m)
      : row_max(n, -std::numeric_limits<double>::infinity()), row_sum(n, 0.0),
        col_max(m, -std::numeric_limits<double>::infinity()), col_sum(m, 0.0) {}
  void reset() {
    std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<double>::infinity());
    std::fill(col_max.begin(), col_max.end(), -std::numeric_limits<double>::infinity());
    std::fill(row_sum.begin(), row_sum.end(), 0.0);
    std::fill(col_sum.begin(), col_sum.end(), 0.0);
  }
  static void merge(double& mx, double& sum, double v) {
    if (std::isnan(v)) {
      sum = v;
    } else if (v > mx) {
      sum = (std::isinf(mx) ? 0.0 : sum * std::exp(mx - v)) + 1.0;
      mx = v;
    } else {
      sum += v == mx ? 1.0 : std::exp(v - mx);
    }
  }
  // lse[k] = logaddexp(lse[k], the given-back entries' lse) for k < count.
  template <typename T>
  static void fold(T* lse, const std::vector<double>& mx, const std::vector<double>& sum,
                   int64_t count) {
    constexpr double inf = std::numeric_limits<double>::infinity();
    for (int64_t k = 0; k < count; ++k) {
      if (mx[k] == -inf) continue;  // nothing given back
      const double extra = mx[k] + std::log(sum[k]), own = lse[k];
      if (std::isnan(extra) || std::isnan(own)) {
        lse[k] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      const double hi = std::max(own, extra);
      lse[k] = static_cast<T>(std::isinf(hi) || own == -inf
                                  ? hi
                                  : hi + std::log(std::exp(own - hi) + std::exp(extra - hi)));
    }
  }
};

namespace tiles {

// An entry of a tile (key j, query i, tile-local) that only one direction drops: its raw tile
// value, and whether the row keeps it (else the column does).
template <typename T>
struct SidedEntry {
  int64_t j, i;
  T raw;
  bool row_keeps;
};

// The one-direction entries of the last tile the calling thread filtered (record_sided).
template <typename T>
std::vector<SidedEntry<T>>& sided_entries() {
  thread_local std::vector<SidedEntry<T>> entries;
  return entries;
}

// code[i] = (row drops) | (column drops) << 1 for tile row x (key `key`, scale b) against the
// queries of the block; returns whether any entry is dropped.
template <typename T, bool kThreshold, bool kGuide>
bool sided_codes(const T* x, const T* gr, int64_t rows, const T* a, T b, const T* thr, T cthr,
                 const T* gthr, T cgthr, const int64_t* pos, int64_t key, int64_t cpos,
                 uint8_t* code) {
  int any = 0;
#pragma omp simd reduction(| : any)
  for (int64_t i = 0; i < rows; ++i) {
    const T v = x[i];
    bool rd = false, cd = false;
    if constexpr (kThreshold) {
      const T s = v * a[i] * b;  // the later passes' s, same bits
      rd = s > thr[i];
      cd = s > cthr;
    }
    if constexpr (kGuide) {
      rd = rd || gr[i] > gthr[i];
      cd = cd || gr[i] > cgthr;
    }
    const bool live = v != -kInf<T>;  // an id-masked entry is no candidate: not counted
    rd = rd && live && pos[i] != key;
    cd = cd && live && i != cpos;
    const int c = static_cast<int>(rd) | (static_cast<int>(cd) << 1);
    code[i] = static_cast<uint8_t>(c);
    any |= c;
  }
  return any != 0;
}

// The symmetric filter of the tile of queries r0 .. r0 + rows (see the top of this file).
template <typename T>
void filter_tile_symmetric(const RowFilter& f, int64_t r0, int64_t rows, at::Tensor& tile,
                           const T* alpha, const T* beta) {
  const int64_t m = tile.size(0);
  auto& recorded = sided_entries<T>();
  recorded.clear();
  if (m == 0 || rows == 0) return;
  T* x = tile.data_ptr<T>();
  at::Tensor guide_tile;  // (m, rows) guide scores of this tile only
  const T* gx = nullptr;
  if (f.guide_q) {
    guide_tile = at::mm(*f.guide_keys, f.guide_q->narrow(0, r0, rows).t()).contiguous();
    gx = guide_tile.data_ptr<T>();
  }
  const int64_t c0 = f.col_offset;
  const T* a = alpha + r0;
  const T* thr = f.threshold ? f.threshold->data_ptr<T>() + r0 : nullptr;
  const T* gthr = f.guide_threshold ? f.guide_threshold->data_ptr<T>() + r0 : nullptr;
  const T* cthr = f.col_threshold ? f.col_threshold->data_ptr<T>() + c0 : nullptr;
  const T* cgthr = f.col_guide_threshold ? f.col_guide_threshold->data_ptr<T>() + c0 : nullptr;
  const int64_t* pos = f.positive_col->data_ptr<int64_t>() + r0;
  const int64_t* cpos = f.col_positive_row->data_ptr<int64_t>() + c0;
  int64_t* row_count = f.dropped ? f.dropped->data_ptr<int64_t>() + r0 : nullptr;
  int64_t* col_count = f.col_dropped ? f.col_dropped->data_ptr<int64_t>() + c0 : nullptr;
  std::vector<uint8_t> code(rows);
  for (int64_t j = 0; j < m; ++j) {
    T* xr = x + j * rows;
    const T* gr = gx ? gx + j * rows : nullptr;
    const T b = beta[j], ct = cthr ? cthr[j] : T(0), cgt = cgthr ? cgthr[j] : T(0);
    const int64_t key = c0 + j, cp = cpos[j] - r0;
    bool any;
    if (thr && gx)
      any = sided_codes<T, true, true>(xr, gr, rows, a, b, thr, ct, gthr, cgt, pos, key, cp,
                                       code.data());
    else if (thr)
      any = sided_codes<T, true, false>(xr, gr, rows, a, b, thr, ct, gthr, cgt, pos, key, cp,
                                        code.data());
    else
      any = sided_codes<T, false, true>(xr, gr, rows, a, b, thr, ct, gthr, cgt, pos, key, cp,
                                        code.data());
    if (!any) continue;
    for (int64_t i = 0; i < rows; ++i) {
      const uint8_t c = code[i];
      if (c == 0) continue;
      if ((c & 1) && row_count) row_count[i] += 1;
      if ((c & 2) && col_count) col_count[j] += 1;
      if (c != 3) {
        const bool row_keeps = c == 2;
        if (f.sided) {
          const double s = static_cast<double>(xr[i] * a[i] * b);
          if (row_keeps)
            SidedLse::merge(f.sided->row_max[r0 + i], f.sided->row_sum[r0 + i], s);
          else
            SidedLse::merge(f.sided->col_max[key], f.sided->col_sum[key], s);
        }
        if (f.record_sided) recorded.push_back({j, i, xr[i], row_keeps});
      }
      xr[i] = -kInf<T>;
    }
  }
}

// The gradient weights of the recorded one-direction entries of the tile (after the weight pass,
// which left them 0): W_ji = beta_j dS_ij with only the direction that keeps the entry. a, g, lse:
// the block's alpha, row gradients and row lse (finite_or_inf); cg, cl: the tile's keys' column
// gradients and lse (cl finite_or_inf), nullptr without the column term.
template <typename T>
void fix_sided_weights(at::Tensor& tile, const T* a, const T* beta, const T* g, const T* lse,
                       const T* cg, const T* cl) {
  const int64_t rows = tile.size(1);
  T* x = tile.data_ptr<T>();
  for (const SidedEntry<T>& e : sided_entries<T>()) {
    const T b = beta[e.j];
    const T s = e.raw * a[e.i] * b;
    T w;
    if (e.row_keeps)
      w = g[e.i] * std::exp(s - lse[e.i]);
    else
      w = cl ? cg[e.j] * std::exp(s - finite_or_inf(cl[e.j])) : T(0);
    x[e.j * rows + e.i] = b * w;
  }
}

}  // namespace tiles
}  // namespace fastcontrast
