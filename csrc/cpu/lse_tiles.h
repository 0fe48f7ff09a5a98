// The Problem of the tiled masked log-sum-exp kernels on CPU (infonce.cpp, gram.cpp): inputs,
// mask, loops over blocks and tile rows, the exact (per-row max) passes over a block with their
// per-thread partial reductions, the column statistics, key chunks, and the folding of unusable
// scales under id masks. See infonce.h for the maths and the contract.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "cpu/false_negatives.h"
#include "cpu/fast_exp.h"
#include "cpu/infonce.h"
#include "cpu/lse_math.h"
#include "cpu/tile_budget.h"
#include "cpu/tile_rows.h"

namespace fastcontrast {
namespace tiles {

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
  const RowFilter* filter;  // nullptr, or the false-negative filter (false_negatives.h)
  int64_t block_rows;

  Problem(const at::Tensor& q_, const at::Tensor& keys_, const at::Tensor& alpha_,
          const at::Tensor& beta_, const Mask& mask, bool large_tile, int64_t requested)
      : q(q_), keys(keys_), alpha_tensor(alpha_), alpha(alpha_.data_ptr<T>()),
        beta(beta_.data_ptr<T>()), n(q_.size(0)), m(keys_.size(0)), d(q_.size(1)),
        exclude_diag(mask.exclude_diag), diag_offset(mask.diag_offset),
        row_ids(mask.row_ids ? mask.row_ids->data_ptr<int64_t>() : nullptr),
        col_ids(mask.col_ids ? mask.col_ids->data_ptr<int64_t>() : nullptr),
        filter(mask.filter ? &*mask.filter : nullptr),
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
      mask_tile(r0, rows, tile);
      fn(r0, rows, tile);
    }
  }

  // The masks written into a raw tile right after its GEMM: equal ids, then the false-negative
  // filter (after the ids, so that it neither counts nor restores an id-masked entry).
  void mask_tile(int64_t r0, int64_t rows, at::Tensor& tile) const {
    if (row_ids) mask_equal_ids(r0, rows, tile);
    if (filter) filter_tile<T>(*filter, r0, rows, tile, alpha, beta);
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

// Per-block workspace of the exact (per-row max) forward: the per-thread partial maxima and
// sums, and the block's shifts and sums.
template <typename T>
struct BlockLseScratch {
  Partials<T> partial;
  Partials<Acc> partial_sums;
  std::vector<T> shift;
  std::vector<Acc> sum;
  explicit BlockLseScratch(int64_t block_rows)
      : partial(block_rows), partial_sums(block_rows), shift(block_rows), sum(block_rows) {}
};

// The exact forward of one block: out[i] = lse of query r0 + i over the tile's unmasked entries,
// and with cols (the symmetric loss) each key's column statistics merged in the same pass as the
// per-query maxima (while the key's tile row is in L1).
template <typename T>
void block_lse(const Problem<T>& p, int64_t r0, int64_t rows, at::Tensor& tile,
               ColumnStats<T>* cols, BlockLseScratch<T>& w, T* out) {
  const T* a = p.alpha + r0;
  if (cols) {
    w.partial.reset(rows, -kInf<T>);
    p.for_each_tile_row(r0, rows, tile, [&](int64_t j, const T* x, int64_t cut) {
      cols->merge(j, w.partial.slot(), x, a, p.beta[j], cut, rows);
    });
    w.partial.combine_max(w.shift.data());
    for (int64_t i = 0; i < rows; ++i) w.shift[i] = safe_shift(w.shift[i]);
  } else {
    block_shift(p, r0, rows, tile, w.partial, w.shift.data());
  }
  block_sums(p, r0, rows, tile, w.partial_sums, w.shift.data(), w.sum.data());
  for (int64_t i = 0; i < rows; ++i) out[i] = query_lse(p, r0, rows, tile, w.shift[i], w.sum[i], i);
}

// block_shift on the calling thread alone (inside a task, tasks.h): the per-query max of the
// block's tile as an exp shift.
template <typename T>
std::vector<T> serial_block_shift(const Problem<T>& p, int64_t r0, int64_t rows,
                                  const at::Tensor& tile) {
  const T* a = p.alpha + r0;
  const T* base = tile.data_ptr<T>();
  std::vector<T> shift(rows, -kInf<T>);
  for (int64_t j = 0; j < p.m; ++j) {
    const int64_t cut = p.cut(j, r0, rows);
    max_into(shift.data(), base + j * rows, a, p.beta[j], 0, cut);
    max_into(shift.data(), base + j * rows, a, p.beta[j], cut + 1, rows);
  }
  for (int64_t i = 0; i < rows; ++i) shift[i] = safe_shift(shift[i]);
  return shift;
}

// block_lse without column statistics on the calling thread alone: the per-query max, then the
// sums of exps in T over kFlushRows keys and in double (FlushedSums).
template <typename T>
void serial_block_lse(const Problem<T>& p, int64_t r0, int64_t rows, const at::Tensor& tile,
                      T* out) {
  const T* a = p.alpha + r0;
  const T* base = tile.data_ptr<T>();
  const std::vector<T> shift = serial_block_shift(p, r0, rows, tile);
  std::vector<Acc> sum(rows, Acc(0));
  FlushedSums<T> acc(sum.data(), rows);
  for (int64_t j = 0; j < p.m; ++j) {
    const int64_t cut = p.cut(j, r0, rows);
    sum_exp_into(acc.data(), base + j * rows, a, p.beta[j], shift.data(), 0, cut);
    sum_exp_into(acc.data(), base + j * rows, a, p.beta[j], shift.data(), cut + 1, rows);
    acc.row_done();
  }
  acc.flush();
  for (int64_t i = 0; i < rows; ++i) out[i] = query_lse(p, r0, rows, tile, shift[i], sum[i], i);
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
    if (m.filter) mask.filter = m.filter->narrowed(c0, c1);
  }
};

// Masking by ids (and the false-negative filter) writes -inf into the raw products, which the passes then scale by alpha_i beta_j:
// a scale that is NaN, 0 or infinite (non-finite inputs under normalisation) would make a masked
// entry NaN. Such calls, and only those, run on the scaled operands alpha q, beta keys with unit
// scales, and the gradients are scaled back (dq = alpha dq', dkeys = beta dkeys': exact).
struct Operands {
  at::Tensor q, keys, alpha, beta;
  bool folded;
};

inline Operands fold_scales(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                            const at::Tensor& beta, const Mask& mask) {
  const auto usable = [](const at::Tensor& s) {  // a loop: no ATen reduction (tasks.h)
    return AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "fold_scales", [&] {
      const scalar_t* v = s.data_ptr<scalar_t>();
      return std::all_of(v, v + s.numel(), [](scalar_t x) { return x > 0 && std::isfinite(x); });
    });
  };
  if ((!mask.row_ids && !mask.filter) || (usable(alpha) && usable(beta))) return {q, keys, alpha, beta, false};
  return {q * alpha.unsqueeze(1), keys * beta.unsqueeze(1), at::ones_like(alpha),
          at::ones_like(beta), true};
}

inline void unfold(const Operands& ops, std::optional<at::Tensor>& grad,
                   const at::Tensor& scale) {
  if (ops.folded && grad) grad->mul_(scale.unsqueeze(1));
}

}  // namespace tiles
}  // namespace fastcontrast
