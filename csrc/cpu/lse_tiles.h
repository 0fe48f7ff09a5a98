// Shared pieces of the tiled masked log-sum-exp kernels on CPU (infonce.cpp, gram.cpp): the tile
// budget, the non-finite rules of the log-sum-exp, the vectorised tile-row passes, per-thread
// partial reductions, the Problem (inputs, mask, loops over blocks and tile rows) and the folding
// of unusable scales under id masks. See infonce.h for the maths and the contract.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/fast_exp.h"
#include "cpu/infonce.h"
#include "cpu/runtime_options.h"

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

// The sums of exps accumulate in double whatever T: a float running sum over M terms drifts by
// up to ~sqrt(M) ulps (1e-6 relative at M = 300), which plain PyTorch's pairwise float reductions
// do not. The hot passes keep float partial sums over kFlushRows tile rows (FlushedSums) and add
// them into the double sums then: a double accumulator in the vectorised loop itself made the
// shared-shift forward ~1.6x slower.
using Acc = double;
constexpr int64_t kFlushRows = 32;

// Per-query partial sums in T over up to kFlushRows tile rows, added into `out` (double) every
// kFlushRows rows and by flush(): call row_done() after each tile row, flush() at the end.
template <typename T>
struct FlushedSums {
  std::vector<T> part;
  Acc* out;
  int64_t pending = 0;
  FlushedSums(Acc* out_, int64_t rows) : part(static_cast<size_t>(rows), T(0)), out(out_) {}
  T* data() { return part.data(); }
  void row_done() {
    if (++pending == kFlushRows) flush();
  }
  void flush() {
    for (size_t i = 0; i < part.size(); ++i) {
      out[i] += part[i];
      part[i] = T(0);
    }
    pending = 0;
  }
};

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();
template <typename T>
constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();

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

// log(exp(a) + exp(b)) as torch.logaddexp: NaN if either is NaN, -inf when both are -inf, +inf
// when either is +inf.
template <typename T>
T log_add_exp(T a, T b) {
  if (std::isnan(a) || std::isnan(b)) return kNaN<T>;
  const T hi = std::max(a, b);
  if (std::isinf(hi)) return hi;
  return hi + std::log1p(std::exp(-std::abs(a - b)));
}

// A max used as the exp shift: 0 when there is no entry (-inf), so exp(-inf - shift) = 0, not NaN.
template <typename T>
T safe_shift(T mx) { return mx == -kInf<T> ? T(0) : mx; }

// Non-finite scores. The max passes skip NaN (s > mx is false) and the exp passes do not: a NaN
// entry makes the sum NaN, and shift + log(sum) keeps it; no entry (sum 0) gives -inf. A +inf
// entry makes the shift +inf and the sum NaN (exp(inf - inf)): the lse is then +inf, or NaN when
// the row also has a NaN entry, which only a scan of that (rare) row can tell. So the hot loops
// stay as they are and the finalisation sorts the cases out, as torch.logsumexp does.
// shift + log(sum) in double: the float rounding of log(sum) alone (up to log M) would add to
// the rounding of the result.
template <typename T>
T lse_from(T shift, Acc sum) {
  if (shift == kInf<T>) return kInf<T>;
  return static_cast<T>(static_cast<double>(shift) + std::log(static_cast<double>(sum)));
}

// An lse of -inf contributes 0 to a gradient: exp(s - (+inf)) = 0 where exp(s - (-inf)) is not.
template <typename T>
T finite_or_inf(T lse) { return lse == -kInf<T> ? kInf<T> : lse; }

template <typename T>
bool any_nan(const T* s, int64_t r) {
  for (int64_t i = 0; i < r; ++i)
    if (std::isnan(s[i])) return true;
  return false;
}

// Shared-shift passes (gram.cpp; infonce.cpp's forward and column-term backward). By
// Cauchy-Schwarz no score exceeds
//   C = max_i |alpha_i| |q_i| * max_j |beta_j| |keys_j|,
// so one shift serves every row's and every column's sum with one exp per entry: with
// c = k ln2 <= C - kSharedShiftHeadroom (k the largest such integer),
// e_ij = exp(s_ij - c) <= e^40.7 (up to the rounding of s), S = sum exp(s - c), lse = c + log S.
// Precision: e_ij is 2^-k exp(s_ij) (fast_exp_shifted), exact in the shift, and c + log S is
// summed in double, so that an lse near 1 is not the difference of two numbers near 40 rounded to
// float (an ulp of 3.8e-6 there): the lse keeps the relative precision of the float sum S, as a
// per-row max shift does. The headroom keeps the sums in range (S <= M e^40.7, far below the
// float maximum e^88) while it lets every lse down to c - 39 >= C - 80 through: at CLIP's logit
// scale of 100 on unit rows C = 100 and the lse sit near 10 .. 40, which a shift of C itself
// (S < e^-40) would send to the exact passes. fast_exp_shifted flushes s - c below -86 (float;
// -707 double) to 0, so a sum S >= kMinSharedShiftSum loses less than M e^-46 (float) of itself; a smaller sum (all of a row's scores far below c: scores spread over more than ~80
// nats, no entry at all) sends the call to the exact two-pass kernels.
// The runtime option shared_shift (runtime_options.h) turns the shared-shift passes off: the
// exact passes only, for the tests and as a baseline.
inline bool shared_shift_enabled() { return runtime_options().shared_shift; }

template <typename T>
constexpr T kMinSharedShiftSum = sizeof(T) == 4 ? T(1e-17) : T(1e-250);
constexpr double kSharedShiftHeadroom = 40;
constexpr double kLn2 = 0.69314718055994530942;

// The shift c = k ln2 above: exp(s - c) = fast_exp_shifted(s, exp_shift), c in double.
// usable is false when the inputs are not finite or |k| > kMaxPow2Shift (scores beyond ~11000:
// the exact passes then).
template <typename T>
struct SharedShift {
  Pow2Shift<T> exp_shift;
  double c;
  bool usable;
};

template <typename T>
SharedShift<T> shared_shift(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                            const at::Tensor& beta) {
  double bound = 0;
  if (q.size(0) > 0 && keys.size(0) > 0) {
    const at::Tensor q_norms = q.norm(2, {1});
    const at::Tensor key_norms = keys.is_same(q) ? q_norms : keys.norm(2, {1});  // a Gram call
    bound = static_cast<double>((q_norms * alpha.abs()).max().item<T>()) *
            static_cast<double>((key_norms * beta.abs()).max().item<T>());
  }
  const double k = std::floor((bound - kSharedShiftHeadroom) / kLn2);
  if (!(std::abs(k) <= kMaxPow2Shift)) return {pow2_shift<T>(0), 0.0, false};  // NaN too
  return {pow2_shift<T>(static_cast<int32_t>(k)), k * kLn2, true};
}

// The smallest shared-shift weight kept (shared_shift_weights): a normal number with its full
// precision.
template <typename T>
constexpr T kMinSharedWeight =
    std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon();

// Backward weights of the shared shift c: the gradient weight g_k exp(s - lse_k) of an entry of
// row (or column) k is exp(s - c) w_k with
//   w_k = g_k exp(c - lse_k),
// so a tile whose entries feed two log-sum-exps (a row's and a column's) takes one exp per entry,
// exp(s - c) (w_i + w_j). Fills w (n values) and returns true when every g_k is finite, every
// lse_k finite or -inf (w_k = 0) and c - lse_k <= 40 (as the forward's sums,
// S_k = exp(lse_k - c) >= e^-40: exp(s - c) then flushes only weights below e^-46 of the row's),
// and every w_k is finite and normal (kMinSharedWeight, or 0 where g_k is); false otherwise, and
// the caller uses the exact two-exp weights.
// w_k is computed in double (c - lse_k exactly) and rounded once.
template <typename T>
bool shared_shift_weights(double shift, const T* lse, const T* g, int64_t n, std::vector<T>& w) {
  w.resize(n);
  for (int64_t k = 0; k < n; ++k) {
    if (!std::isfinite(g[k]) || std::isnan(lse[k])) return false;
    if (lse[k] == -kInf<T>) {
      w[k] = T(0);
      continue;
    }
    if (!(shift - lse[k] <= 40.0)) return false;
    w[k] = static_cast<T>(g[k] * std::exp(shift - static_cast<double>(lse[k])));
    if (!std::isfinite(w[k]) || (g[k] != T(0) && !(std::abs(w[k]) >= kMinSharedWeight<T>)))
      return false;
  }
  return true;
}

// lse = c + log(sum) of the shared shift, in double (see above).
template <typename T>
T shared_lse(double shift, Acc sum) {
  return static_cast<T>(shift + std::log(sum));
}

// Whether every sum[k], k < n, is at least kMinSharedShiftSum (false for NaN).
template <typename T>
bool shared_sums_usable(const Acc* sum, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    if (!(sum[k] >= static_cast<Acc>(kMinSharedShiftSum<T>))) return false;
  return true;
}

// Tile-row kernels. x is one tile row (R raw products with key j), a = alpha[r0:r0+R], b = beta_j,
// so s_i = x_i * a_i * b. Each runs on a query range [i0, i1); callers skip the masked query.

// mx_i <- max(mx_i, s_i).
template <typename T>
void max_into(T* mx, const T* x, const T* a, T b, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const T s = x[i] * a[i] * b;
    mx[i] = s > mx[i] ? s : mx[i];
  }
}

// sum_i <- sum_i + exp(s_i - shift_i).
template <typename T, typename S>
void sum_exp_into(S* sum, const T* x, const T* a, T b, const T* shift, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) sum[i] += fast_exp(x[i] * a[i] * b - shift[i]);
}

// As sum_exp_into, and x_i <- b * exp(s_i - shift_i): the gradient weight overwrites the tile.
template <typename T, typename S>
void exp_weights_into(S* sum, T* x, const T* a, T b, const T* shift, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const T e = fast_exp(x[i] * a[i] * b - shift[i]);
    sum[i] += e;
    x[i] = e * b;
  }
}

// sum_i <- sum_i + e_i, e_i = exp(s_i - c) with one shift c for every query; returns sum_i e_i
// (the key's own sum of the same exps; over at most R queries, in vector lanes).
template <typename T>
T shared_shift_sums_into(T* sum, const T* x, const T* a, T b, const Pow2Shift<T>& shift,
                         int64_t i0, int64_t i1) {
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = i0; i < i1; ++i) {
    const T e = fast_exp_shifted(x[i] * a[i] * b, shift);
    sum[i] += e;
    total += e;
  }
  return total;
}

// s_i into sbuf and mx_i <- max(mx_i, s_i). Returns max_i s_i (for the column statistics).
template <typename T>
T scores_max_into(T* sbuf, T* mx, const T* x, const T* a, T b, int64_t i0, int64_t i1) {
  T row_max = -kInf<T>;
#pragma omp simd reduction(max : row_max)
  for (int64_t i = i0; i < i1; ++i) {
    const T s = x[i] * a[i] * b;
    sbuf[i] = s;
    mx[i] = s > mx[i] ? s : mx[i];
    row_max = s > row_max ? s : row_max;
  }
  return row_max;
}

// sum_i exp(s_i - shift).
template <typename T>
Acc sum_exp(const T* s, T shift, int64_t r) {
  Acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < r; ++i) sum += fast_exp(s[i] - shift);
  return sum;
}

// Per-thread partial vectors (one slot of `rows` values per thread) of a per-query reduction
// over the keys, combined after the parallel pass. A thread only ever touches its own slot.
template <typename T>
struct Partials {
  int64_t threads, rows = 0;
  std::vector<T> data;
  explicit Partials(int64_t max_rows)
      : threads(at::get_num_threads()), data(static_cast<size_t>(threads * max_rows)) {}
  void reset(int64_t rows_, T init) {
    rows = rows_;
    std::fill(data.begin(), data.begin() + threads * rows, init);
  }
  T* slot() { return data.data() + static_cast<int64_t>(at::get_thread_num()) * rows; }
  void combine_max(T* out) const {
    std::copy(data.begin(), data.begin() + rows, out);
    for (int64_t t = 1; t < threads; ++t)
      for (int64_t i = 0; i < rows; ++i) out[i] = std::max(out[i], data[t * rows + i]);
  }
  void combine_sum(T* out) const {
    std::copy(data.begin(), data.begin() + rows, out);
    for (int64_t t = 1; t < threads; ++t)
      for (int64_t i = 0; i < rows; ++i) out[i] += data[t * rows + i];
  }
};

// The inputs shared by every kernel, and the loops over blocks and tile rows.
template <typename T>
struct Problem {
  const at::Tensor& q;
  const at::Tensor& keys;
  const at::Tensor& alpha_tensor;
  const T* alpha;
  const T* beta;
  int64_t n, m, d;
  bool exclude_diag;
  int64_t diag_offset;
  const int64_t* row_ids;  // nullptr, or (N,): entry (i, j) masked where row_ids_i == col_ids_j >= 0
  const int64_t* col_ids;
  int64_t block_rows;

  Problem(const at::Tensor& q_, const at::Tensor& keys_, const at::Tensor& alpha_,
          const at::Tensor& beta_, const Mask& mask, bool large_tile, int64_t requested)
      : q(q_), keys(keys_), alpha_tensor(alpha_), alpha(alpha_.data_ptr<T>()),
        beta(beta_.data_ptr<T>()), n(q_.size(0)), m(keys_.size(0)), d(q_.size(1)),
        exclude_diag(mask.exclude_diag), diag_offset(mask.diag_offset),
        row_ids(mask.row_ids ? mask.row_ids->data_ptr<int64_t>() : nullptr),
        col_ids(mask.col_ids ? mask.col_ids->data_ptr<int64_t>() : nullptr),
        block_rows(choose_block_rows(n, m, d, sizeof(T), large_tile, requested)) {}

  // The query (index within the block r0 .. r0 + rows) masked in tile row j, or rows if none:
  // tile row j's unmasked queries are [0, cut) and [cut + 1, rows).
  int64_t cut(int64_t j, int64_t r0, int64_t rows) const {
    if (!exclude_diag) return rows;
    const int64_t i = j - diag_offset - r0;
    return (i >= 0 && i < rows) ? i : rows;
  }

  // Calls fn(r0, rows, tile) for each block; tile (M, rows) = keys @ q[r0:r0+rows]^T.
  template <typename Fn>
  void for_each_block(Fn&& fn) const {
    at::Tensor buffer = at::empty({m * block_rows}, q.options());
    for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
      const int64_t rows = std::min(block_rows, n - r0);
      at::Tensor tile = buffer.narrow(0, 0, m * rows).view({m, rows});
      at::mm_out(tile, keys, q.narrow(0, r0, rows).t());
      if (row_ids) mask_equal_ids(r0, rows, tile);
      fn(r0, rows, tile);
    }
  }

  // Sets tile entries (j, i) with row_ids[r0 + i] == col_ids[j] >= 0 to `value`: -inf after the
  // GEMM, so that every pass sees s = -inf there (alpha, beta > 0, see fold_scales) and the
  // gradient weight exp(-inf) = 0; 0 over gradient weights that a NaN lse or a non-finite
  // upstream gradient made NaN there. The block's ids are sorted once and each key looks its id
  // up: O((M + R) log R), no per-element mask test.
  void mask_equal_ids(int64_t r0, int64_t rows, at::Tensor& tile, T value = -kInf<T>) const {
    std::vector<std::pair<int64_t, int64_t>> sorted;  // (id, query within the block)
    sorted.reserve(rows);
    for (int64_t i = 0; i < rows; ++i)
      if (row_ids[r0 + i] >= 0) sorted.emplace_back(row_ids[r0 + i], i);
    if (sorted.empty()) return;
    std::sort(sorted.begin(), sorted.end());
    T* base = tile.data_ptr<T>();
    at::parallel_for(0, m, kElemsPerTask, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const int64_t id = col_ids[j];
        if (id < 0) continue;
        auto it = std::lower_bound(sorted.begin(), sorted.end(), std::make_pair(id, int64_t(0)));
        for (; it != sorted.end() && it->first == id; ++it) base[j * rows + it->second] = value;
      }
    });
  }

  // Whether entry (query `row`, key j) is masked.
  bool masked(int64_t row, int64_t j) const {
    return (exclude_diag && j == row + diag_offset) ||
           (row_ids && row_ids[row] >= 0 && row_ids[row] == col_ids[j]);
  }

  // Whether query i of the block has an unmasked NaN score, from the raw tile: a scan of M
  // entries, only for the rare queries whose max is +inf (see lse_from).
  bool query_has_nan(int64_t r0, int64_t rows, const at::Tensor& tile, int64_t i) const {
    const T* x = tile.data_ptr<T>();
    const T a = alpha[r0 + i];
    for (int64_t j = 0; j < m; ++j)
      if (cut(j, r0, rows) != i && std::isnan(x[j * rows + i] * a * beta[j])) return true;
    return false;
  }

  // Runs fn(j, x, cut) over the tile rows in parallel: x = tile row j (key j), cut as above.
  template <typename Fn>
  void for_each_tile_row(int64_t r0, int64_t rows, at::Tensor& tile, Fn&& fn) const {
    T* base = tile.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(rows, 1));
    at::parallel_for(0, m, grain, [&](int64_t begin, int64_t end) {
      // int64 offsets: M * R passes 2^31 for M above 4M keys.
      for (int64_t j = begin; j < end; ++j) fn(j, base + j * rows, cut(j, r0, rows));
    });
  }
};

// Per-query max of the block into shift (as an exp shift: 0 where a query has no entry).
template <typename T>
void block_shift(const Problem<T>& p, int64_t r0, int64_t rows, at::Tensor& tile,
                 Partials<T>& partial, T* shift) {
  const T* a = p.alpha + r0;
  partial.reset(rows, -kInf<T>);
  p.for_each_tile_row(r0, rows, tile, [&](int64_t j, const T* x, int64_t cut) {
    T* mx = partial.slot();
    max_into(mx, x, a, p.beta[j], 0, cut);
    max_into(mx, x, a, p.beta[j], cut + 1, rows);
  });
  partial.combine_max(shift);
  for (int64_t i = 0; i < rows; ++i) shift[i] = safe_shift(shift[i]);
}

// Sums of the block: sum[i] = sum_j exp(s_ij - shift[i]) over the unmasked entries.
template <typename T>
void block_sums(const Problem<T>& p, int64_t r0, int64_t rows, at::Tensor& tile,
                Partials<Acc>& partial, const T* shift, Acc* sum) {
  const T* a = p.alpha + r0;
  partial.reset(rows, T(0));
  p.for_each_tile_row(r0, rows, tile, [&](int64_t j, const T* x, int64_t cut) {
    Acc* acc = partial.slot();
    sum_exp_into(acc, x, a, p.beta[j], shift, 0, cut);
    sum_exp_into(acc, x, a, p.beta[j], shift, cut + 1, rows);
  });
  partial.combine_sum(sum);
}

// The lse of query i of the block from its shift and sum (the raw tile still in place).
template <typename T>
T query_lse(const Problem<T>& p, int64_t r0, int64_t rows, const at::Tensor& tile, T shift,
            Acc sum, int64_t i) {
  const bool nan = shift == kInf<T> && p.query_has_nan(r0, rows, tile, i);
  return nan ? kNaN<T> : lse_from(shift, sum);
}

// Running per-key (max, sum) of a column log-sum-exp, merged tile row after tile row.
template <typename T>
struct ColumnStats {
  std::vector<T> max;
  std::vector<Acc> sum;
  // Per key: an unmasked NaN score seen once its max is +inf (the sum cannot tell them apart
  // from then on). char, not bool: threads write different keys concurrently.
  std::vector<char> nan;
  explicit ColumnStats(int64_t m) : max(m, -kInf<T>), sum(m, Acc(0)), nan(m, 0) {}

  // Merges tile row x (scores s_i = x_i a_i b with the block's queries, the one at `cut`
  // masked) into key k's statistics, and the per-query maxima into mx.
  void merge(int64_t k, T* mx, const T* x, const T* a, T b, int64_t cut, int64_t rows) {
    thread_local std::vector<T> sbuf;
    sbuf.resize(rows);
    const T row_max = std::max(scores_max_into(sbuf.data(), mx, x, a, b, 0, cut),
                               scores_max_into(sbuf.data(), mx, x, a, b, cut + 1, rows));
    if (cut < rows) sbuf[cut] = -kInf<T>;
    if (row_max == kInf<T> || max[k] == kInf<T>) {  // rare: the lse is +inf or NaN
      nan[k] = nan[k] || std::isnan(sum[k]) || any_nan(sbuf.data(), rows);
      max[k] = kInf<T>;
      return;
    }
    const T new_max = std::max(max[k], row_max);
    const T s = safe_shift(new_max);
    sum[k] = sum[k] * fast_exp(max[k] - s) + sum_exp(sbuf.data(), s, rows);
    max[k] = new_max;
  }

  T lse(int64_t k) const { return nan[k] ? kNaN<T> : lse_from(safe_shift(max[k]), sum[k]); }
};

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

// Keys c0 .. c1 of a problem as the operands of their own Problem (chunk-local key index j is
// key c0 + j): keys, beta and the column ids narrowed, the diagonal offset shifted by c0.
struct KeyChunk {
  at::Tensor keys, beta;
  Mask mask;
  KeyChunk(const at::Tensor& keys_, const at::Tensor& beta_, const Mask& m, int64_t c0, int64_t c1)
      : keys(keys_.narrow(0, c0, c1 - c0)), beta(beta_.narrow(0, c0, c1 - c0)),
        mask{m.exclude_diag, m.diag_offset - c0, m.row_ids, std::nullopt} {
    if (m.col_ids) mask.col_ids = m.col_ids->narrow(0, c0, c1 - c0);
  }
};

// Masking by ids writes -inf into the raw products, which the passes then scale by alpha_i beta_j:
// a scale that is NaN, 0 or infinite (non-finite inputs under normalisation) would make a masked
// entry NaN. Such calls, and only those, run on the scaled operands alpha q, beta keys with unit
// scales, and the gradients are scaled back (dq = alpha dq', dkeys = beta dkeys': exact).
struct Operands {
  at::Tensor q, keys, alpha, beta;
  bool folded;
};

inline Operands fold_scales(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                            const at::Tensor& beta, const Mask& mask) {
  const auto usable = [](const at::Tensor& s) {
    return (s > 0).logical_and(s.isfinite()).all().item<bool>();
  };
  if (!mask.row_ids || (usable(alpha) && usable(beta))) return {q, keys, alpha, beta, false};
  return {q * alpha.unsqueeze(1), keys * beta.unsqueeze(1), at::ones_like(alpha),
          at::ones_like(beta), true};
}

inline void unfold(const Operands& ops, std::optional<at::Tensor>& grad,
                   const at::Tensor& scale) {
  if (ops.folded && grad) grad->mul_(scale.unsqueeze(1));
}

}  // namespace tiles
}  // namespace fastcontrast
