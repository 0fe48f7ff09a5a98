// The false-negative filter of a symmetric loss in one pass on CPU (RowFilter with the column rule,
// row_filter.h): each raw score tile is computed once, and entry (i, j) is dropped from row i's
// log-sum-exp by row i's thresholds and from column j's by column j's. An entry that both drop is
// written -inf in the tile, as the one-directional filter does (false_negatives.h). An entry that
// only one direction drops (with the suite's guide nearly half of the ~36% dropped per direction)
// reaches the passes in one of two ways:
//   masks (RowFilter::sided_masks: the shared-shift forward and every backward): it stays in the
//             tile, and the tile's codes (bit 0: the row drops it, bit 1: the column) are kept in
//             the calling thread's SidedMask; the passes' tile rows with any such entry run their
//             kSided variant, which selects each direction's term by its bit in the vector loop:
//               forward:  e = exp(s - c) once, row sum += row keeps ? e : 0, column sum likewise;
//               backward: W_ji = beta_j (g_i exp(s - lse_i) [row keeps]
//                                        + c_j exp(s - col_lse_j) [column keeps]).
//             A select, not a product with 0/1: a NaN score still reaches the direction that
//             keeps it. The shared shift c bounds every score (Cauchy-Schwarz), so it is as valid
//             for these entries as for any other.
//   give-back (the exact forward, the fallback of the shared shift): it is ALSO written -inf, so
//             that the unchanged exact passes see the union of the drops, and is merged into a
//             per-row (per-column) online log-sum-exp (SidedLse), folded into the row (column)
//             lse with logaddexp at the end: no subtraction, no cancellation. A scalar pass, but
//             only where the shared shift is unusable (rare).
//
// Exclusive access: the tiles of a query block (of a key chunk) run one at a time (grid_tiles.h),
// so a tile's rows' and columns' counts and accumulators are written by one task at a time; the
// mask is the calling thread's, filled by mask_tile and read by the same task's passes.
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
    if (std::isnan(v) || std::isnan(mx)) {  // NaN from then on, and folded in (mx != -inf)
      mx = sum = std::numeric_limits<double>::quiet_NaN();
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

// The codes of the last tile the calling thread filtered with sided_masks: code (m x rows, the
// tile's layout; 1 or 2 only where exactly one direction drops the entry) and per tile row
// whether it has any such entry.
struct SidedMask {
  int64_t rows = 0;
  std::vector<uint8_t> code, row_any;
  void reset(int64_t m, int64_t rows_) {
    rows = rows_;
    code.resize(static_cast<size_t>(m * rows));
    row_any.assign(static_cast<size_t>(m), 0);
  }
  // The codes of tile row j, or nullptr where no entry of it is dropped in one direction only.
  const uint8_t* row(int64_t j) const { return row_any[j] ? code.data() + j * rows : nullptr; }
};

inline SidedMask& sided_mask() {
  thread_local SidedMask mask;
  return mask;
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

// Counts the drops of tile row xr (codes from sided_codes) and writes -inf over the entries that
// both directions drop; returns whether any entry is dropped in one direction only.
template <typename T>
bool apply_codes(T* xr, const uint8_t* code, int64_t rows, int64_t* row_count,
                 int64_t* col_count) {
  if (row_count) {
#pragma omp simd
    for (int64_t i = 0; i < rows; ++i) row_count[i] += code[i] & 1;
  }
  int one = 0;
  int64_t cols = 0;
#pragma omp simd reduction(| : one) reduction(+ : cols)
  for (int64_t i = 0; i < rows; ++i) {
    const int c = code[i];
    cols += c >> 1;
    one |= static_cast<int>(c == 1 || c == 2);
    xr[i] = c == 3 ? -kInf<T> : xr[i];
  }
  if (col_count) *col_count += cols;
  return one != 0;
}

// The symmetric filter of the tile of queries r0 .. r0 + rows (see the top of this file).
template <typename T>
void filter_tile_symmetric(const RowFilter& f, int64_t r0, int64_t rows, at::Tensor& tile,
                           const T* alpha, const T* beta) {
  const int64_t m = tile.size(0);
  SidedMask& mask = sided_mask();
  if (f.sided_masks) mask.reset(m, rows);
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
  std::vector<uint8_t> scratch(f.sided_masks ? 0 : rows);
  for (int64_t j = 0; j < m; ++j) {
    T* xr = x + j * rows;
    const T* gr = gx ? gx + j * rows : nullptr;
    uint8_t* code = f.sided_masks ? mask.code.data() + j * rows : scratch.data();
    const T b = beta[j], ct = cthr ? cthr[j] : T(0), cgt = cgthr ? cgthr[j] : T(0);
    const int64_t key = c0 + j, cp = cpos[j] - r0;
    bool any;
    if (thr && gx)
      any = sided_codes<T, true, true>(xr, gr, rows, a, b, thr, ct, gthr, cgt, pos, key, cp, code);
    else if (thr)
      any = sided_codes<T, true, false>(xr, gr, rows, a, b, thr, ct, gthr, cgt, pos, key, cp,
                                        code);
    else
      any = sided_codes<T, false, true>(xr, gr, rows, a, b, thr, ct, gthr, cgt, pos, key, cp,
                                        code);
    if (!any || !apply_codes(xr, code, rows, row_count, col_count ? col_count + j : nullptr))
      continue;
    if (f.sided_masks) {  // the passes apply the one-direction drops
      mask.row_any[j] = 1;
      continue;
    }
    for (int64_t i = 0; i < rows; ++i) {  // give back (the exact forward), or drop (the counts)
      const uint8_t c = code[i];
      if (c != 1 && c != 2) continue;
      if (f.sided) {
        const double s = static_cast<double>(xr[i] * a[i] * b);
        if (c == 2)  // the row keeps it
          SidedLse::merge(f.sided->row_max[r0 + i], f.sided->row_sum[r0 + i], s);
        else
          SidedLse::merge(f.sided->col_max[key], f.sided->col_sum[key], s);
      }
      xr[i] = -kInf<T>;
    }
  }
}

}  // namespace tiles
}  // namespace fastcontrast
