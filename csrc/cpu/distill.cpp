// Similarity distillation on CPU (see distill.h for the maths and the contract).
//
// Rows are processed in blocks of R (r0 .. r0 + R). Per block, two score tiles covering whole
// rows: S = sq[r0:r0+R] @ sk^T and T = tq[r0:r0+R] @ tk^T (R x M each, ATen GEMMs). Because a
// tile holds every key of its rows, each row's maxima are exact (two passes over the row: max,
// then the exps), so the row statistics need no online rescaling. The column statistics run
// across the blocks: per column, running maxima and sums merged block by block with the
// flash-attention rescaling (sums times e^{old max - new max}), the teacher-weighted sum
// sum_i e^{t_ij - max} s_ij rescaled with the teacher's sum. Sums accumulate in double.
//
// The backward recomputes both tiles, overwrites S with G (distill.h) and applies the two
// gradient GEMMs gq[r0:r0+R] = G @ sk and gk += G^T @ sq[r0:r0+R]. The blocks run as tasks
// (for_each_row_block), the updates shared across blocks (gk, the column statistics) by column
// chunk in block order. Memory: threads + 1 pairs of tiles (kInFlightBytes) and O(N + M)
// vectors.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "cpu/block_tasks.h"
#include "cpu/distill.h"
#include "cpu/fast_exp.h"
#include "cpu/host_threads.h"
#include "cpu/outputs.h"
#include "cpu/tasks.h"

namespace fastcontrast {
namespace {

using OptTensor = std::optional<at::Tensor>;

// The tiles in flight: threads + 1 slots (block_tasks.h) of two R x M tiles. 48 MiB gives
// R = 128 at M = 16384 fp32 on 2 threads (the R of the former single pair of 16 MiB), a few
// percent of the two N x M matrices a materialised formulation holds.
constexpr int64_t kInFlightBytes = int64_t(48) << 20;
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlockRows = 1024;
constexpr int64_t kFlushEvery = 512;  // elements summed in T before a flush into double

int64_t choose_block_rows(int64_t n, int64_t m, int64_t elem_size, int64_t requested) {
  int64_t r = requested;
  if (r <= 0) {
    const int64_t slots = tiles::tile_slots(std::max<int64_t>(n, 1));
    r = kInFlightBytes / std::max<int64_t>(slots * 2 * m * elem_size, 1);
    r = std::clamp<int64_t>(r / 16 * 16, kMinBlockRows, kMaxBlockRows);
  }
  return std::max<int64_t>(1, std::min(r, n));
}

// Scales a row of both tiles in place and returns their maxima.
template <typename T>
FASTCONTRAST_ALWAYS_INLINE void scale_row(T* s, T* t, int64_t m, T ss, T ts, T& ms, T& mt) {
  T a = -std::numeric_limits<T>::infinity(), b = a;
#pragma omp simd reduction(max : a, b)
  for (int64_t j = 0; j < m; ++j) {
    s[j] *= ss;
    t[j] *= ts;
    a = std::max(a, s[j]);
    b = std::max(b, t[j]);
  }
  ms = a;
  mt = b;
}

// Row statistics of one (scaled) tile row: lse^S, lse^T, w = sum_j p^T_j s_j. The sums run
// in T (vectorised) over runs of kFlushEvery elements, each run flushed into double. With
// kKeepExps the row's exps e^{s - max}, e^{t - max} overwrite the scores and inv_sums gets
// (1 / sum_s, 1 / sum_t): the probabilities of the gradient without another exp.
template <typename T, bool kKeepExps>
FASTCONTRAST_ALWAYS_INLINE void row_stats(T* s, T* t, int64_t m, T ms, T mt, T* lse_s, T* lse_t,
                                          T* w, T* inv_sums) {
  double sum_s = 0, sum_t = 0, weighted = 0;
  for (int64_t j0 = 0; j0 < m; j0 += kFlushEvery) {
    const int64_t j1 = std::min(m, j0 + kFlushEvery);
    T run_s = 0, run_t = 0, run_w = 0;
#pragma omp simd reduction(+ : run_s, run_t, run_w)
    for (int64_t j = j0; j < j1; ++j) {
      const T et = fast_exp(t[j] - mt);
      const T es = fast_exp(s[j] - ms);
      run_s += es;
      run_t += et;
      run_w += et * s[j];
      if (kKeepExps) {
        s[j] = es;
        t[j] = et;
      }
    }
    sum_s += run_s;
    sum_t += run_t;
    weighted += run_w;
  }
  *lse_s = T(ms + std::log(sum_s));
  *lse_t = T(mt + std::log(sum_t));
  *w = T(weighted / sum_t);
  if (kKeepExps) {
    inv_sums[0] = T(1.0 / sum_s);
    inv_sums[1] = T(1.0 / sum_t);
  }
}

// Running column state: maxima and sums of the student and teacher scores over the rows seen.
struct Columns {
  std::vector<double> max_s, sum_s, max_t, sum_t, weighted;
  explicit Columns(int64_t m)
      : max_s(m, -std::numeric_limits<double>::infinity()), sum_s(m, 0.0),
        max_t(m, -std::numeric_limits<double>::infinity()), sum_t(m, 0.0), weighted(m, 0.0) {}
};

// Merges the rows of one block (scaled tiles, `rows` x m) into columns j0 .. j1.
template <typename T>
void merge_columns(const T* s, const T* t, int64_t rows, int64_t m, int64_t j0, int64_t j1,
                   Columns& c) {
  const int64_t width = j1 - j0;
  std::vector<T> bs(s + j0, s + j1), bt(t + j0, t + j1);  // the block's column maxima
  for (int64_t i = 1; i < rows; ++i) {
    const T* si = s + i * m + j0;
    const T* ti = t + i * m + j0;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      bs[j] = std::max(bs[j], si[j]);
      bt[j] = std::max(bt[j], ti[j]);
    }
  }
  std::vector<T> ms(width), mt(width);
  for (int64_t j = 0; j < width; ++j) {  // rescale the running sums to the new maxima
    const int64_t col = j0 + j;
    const double new_s = std::max(c.max_s[col], double(bs[j]));
    const double new_t = std::max(c.max_t[col], double(bt[j]));
    c.sum_s[col] *= std::exp(c.max_s[col] - new_s);
    const double rescale_t = std::exp(c.max_t[col] - new_t);
    c.sum_t[col] *= rescale_t;
    c.weighted[col] *= rescale_t;
    c.max_s[col] = new_s;
    c.max_t[col] = new_t;
    ms[j] = T(new_s);
    mt[j] = T(new_t);
  }
  // The block's sums in T (vectorised over the columns; a block has at most kMaxBlockRows
  // rows), then added to the running double sums.
  std::vector<T> sum_s(width, T(0)), sum_t(width, T(0)), weighted(width, T(0));
  for (int64_t i = 0; i < rows; ++i) {
    const T* si = s + i * m + j0;
    const T* ti = t + i * m + j0;
#pragma omp simd
    for (int64_t j = 0; j < width; ++j) {
      const T et = fast_exp(ti[j] - mt[j]);
      sum_s[j] += fast_exp(si[j] - ms[j]);
      sum_t[j] += et;
      weighted[j] += et * si[j];
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    c.sum_s[j0 + j] += sum_s[j];
    c.sum_t[j0 + j] += sum_t[j];
    c.weighted[j0 + j] += weighted[j];
  }
}

// The score tiles of rows r0 .. r0 + rows, unscaled, in one slot's buffers.
struct Tiles {
  at::Tensor s_buffer, t_buffer;
  at::Tensor s, t;
  void compute(const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq,
               const at::Tensor& tk, int64_t block_rows, int64_t r0, int64_t rows) {
    const int64_t m = sk.size(0);
    if (!s_buffer.defined()) {
      s_buffer = at::empty({block_rows * m}, sq.options());
      t_buffer = at::empty({block_rows * m}, sq.options());
    }
    s = s_buffer.narrow(0, 0, rows * m).view({rows, m});
    t = t_buffer.narrow(0, 0, rows * m).view({rows, m});
    at::mm_out(s, sq.narrow(0, r0, rows), sk.t());
    at::mm_out(t, tq.narrow(0, r0, rows), tk.t());
  }
};

// Streams the blocks of query rows as a task graph (tasks.h, block_tasks.h): one task per block
// computes both score tiles of its rows (single-threaded GEMMs), calls row_fn(row, s_row, t_row)
// for each row (it may scale both rows and overwrite s_row with G) and block_fn(r0, rows,
// tiles) (the block's own outputs); then one task per (block, column chunk j0 .. j1) calls
// chunk_fn(r0, rows, tiles, j0, j1) (the updates shared across blocks: gk, the column
// statistics), each chunk's updates in block order, so the sums are the same on every run. No
// barrier per pass: with the cores shared, a descheduled thread held up every parallel_for of
// the former fork-join loop. Memory: threads + 1 slots of two R x M tiles.
template <typename T, typename RowFn, typename BlockFn, typename ChunkFn>
void for_each_row_block(const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq,
                        const at::Tensor& tk, int64_t block_rows, int64_t chunk, bool chunks,
                        RowFn&& row_fn, BlockFn&& block_fn, ChunkFn&& chunk_fn) {
  const int64_t n = sq.size(0), m = sk.size(0);
  const int64_t nb = (n + block_rows - 1) / block_rows;
  const int64_t nc = chunks && m > 0 ? (m + chunk - 1) / chunk : 0;
  const int64_t slots = tiles::tile_slots(nb);
  tiles::TaskGraph graph(nb * (1 + nc));
  tiles::add_block_edges(graph, nb, nc, slots);
  std::vector<Tiles> buffers(static_cast<size_t>(slots));
  graph.run(
      [&](int64_t task, int64_t) {
        const auto [b, k, slot] = tiles::block_task(task, nc, slots);
        const int64_t r0 = b * block_rows, rows = std::min(block_rows, n - r0);
        Tiles& t = buffers[static_cast<size_t>(slot)];
        if (k >= 0) {
          chunk_fn(r0, rows, t, k * chunk, std::min(m, (k + 1) * chunk));
          return;
        }
        t.compute(sq, sk, tq, tk, block_rows, r0, rows);
        T* s_tile = t.s.data_ptr<T>();
        T* t_tile = t.t.data_ptr<T>();
        for (int64_t i = 0; i < rows; ++i) row_fn(r0 + i, s_tile + i * m, t_tile + i * m);
        block_fn(r0, rows, t);
      },
      [](int64_t) {});
}

// gq[r0 : r0 + rows] = G sk, G the block's gradient tile.
void add_query_gradient(const Tiles& tiles, const at::Tensor& sk, int64_t r0, int64_t rows,
                        OptTensor& gq) {
  if (!gq) return;
  at::Tensor gq_block = gq->narrow(0, r0, rows);
  at::mm_out(gq_block, tiles.s, sk);
}

// gk[j0 : j1] += G[:, j0 : j1]^T sq[r0 : r0 + rows] (block 0 first zeroes the rows).
void add_key_gradient(const Tiles& tiles, const at::Tensor& sq, int64_t r0, int64_t rows,
                      int64_t j0, int64_t j1, OptTensor& gk) {
  if (!gk) return;
  at::Tensor gk_chunk = gk->narrow(0, j0, j1 - j0);
  if (r0 == 0) gk_chunk.zero_();
  gk_chunk.addmm_(tiles.s.narrow(1, j0, j1 - j0).t(), sq.narrow(0, r0, rows));
}

// G_ij = a P^S_ij - g P^T_ij from a row of exps (row_stats<T, true>), in place of them
// (a = g for distillation alone; a = g + the contrastive weight for the combined loss).
template <typename T>
FASTCONTRAST_ALWAYS_INLINE void row_gradient(T* es, const T* et, int64_t m, T a_row, T g,
                                             const T* inv_sums) {
  const T a = a_row * inv_sums[0], b = g * inv_sums[1];
#pragma omp simd
  for (int64_t j = 0; j < m; ++j) es[j] = a * es[j] - b * et[j];
}

// The row (and column) statistics; with row_grad (rows only: the row statistics of a tile
// row are final once it is seen) also gq, gk of the row direction from the same tiles, so a
// reduced one-direction loss costs four products instead of six.
template <typename T>
std::tuple<at::Tensor, OptTensor, OptTensor, OptTensor> forward_impl(
    const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq, const at::Tensor& tk,
    T ss, T ts, bool with_cols, const OptTensor& row_grad, const OptTensor& row_student_grad,
    bool need_gq, bool need_gk, int64_t requested) {
  const int64_t n = sq.size(0), m = sk.size(0), d = sq.size(1);
  const int64_t block_rows = choose_block_rows(n, m, sizeof(T), requested);
  const int64_t chunk = tiles::chunk_keys(block_rows, sizeof(T), requested);
  const bool with_grad = row_grad.has_value();
  // The gradient overwrites the tiles the column merge would read.
  TORCH_CHECK(!(with_grad && with_cols), "distill_forward: row_grad and with_cols exclude "
              "each other");
  OptTensor gq, gk;
  if (with_grad && need_gq) gq = new_output({n, d}, sq.options());
  // Accumulated: block 0's update of each chunk zeroes its rows (zeros when there are no rows).
  if (with_grad && need_gk) gk = n > 0 ? new_output({m, d}, sq.options())
                                       : at::zeros({m, d}, sq.options());
  const T* g = with_grad ? row_grad->data_ptr<T>() : nullptr;
  const T* a = row_student_grad ? row_student_grad->data_ptr<T>() : g;  // weights of P^S
  at::Tensor rows_out = new_output({3, n}, sq.options());
  T* lse_s = rows_out.data_ptr<T>();
  T* lse_t = lse_s + n;
  T* w = lse_t + n;
  Columns columns(with_cols ? m : 0);
  for_each_row_block<T>(
      sq, sk, tq, tk, block_rows, chunk, with_cols || gk.has_value(),
      [&](int64_t row, T* s, T* t) {
        T ms, mt;
        scale_row(s, t, m, ss, ts, ms, mt);
        if (with_grad) {
          T inv_sums[2];
          row_stats<T, true>(s, t, m, ms, mt, lse_s + row, lse_t + row, w + row, inv_sums);
          row_gradient(s, t, m, a[row], g[row], inv_sums);
        } else {
          row_stats<T, false>(s, t, m, ms, mt, lse_s + row, lse_t + row, w + row, nullptr);
        }
      },
      [&](int64_t r0, int64_t rows, const Tiles& tiles) {
        add_query_gradient(tiles, sk, r0, rows, gq);
      },
      [&](int64_t r0, int64_t rows, const Tiles& tiles, int64_t j0, int64_t j1) {
        add_key_gradient(tiles, sq, r0, rows, j0, j1, gk);
        if (with_cols) {
          merge_columns(tiles.s.data_ptr<T>(), tiles.t.data_ptr<T>(), rows, m, j0, j1, columns);
        }
      });
  OptTensor cols_out;
  if (with_cols) {
    cols_out = new_output({3, m}, sq.options());
    T* c = cols_out->data_ptr<T>();
    for (int64_t j = 0; j < m; ++j) {
      c[j] = T(columns.max_s[j] + std::log(columns.sum_s[j]));
      c[m + j] = T(columns.max_t[j] + std::log(columns.sum_t[j]));
      c[2 * m + j] = T(columns.weighted[j] / columns.sum_t[j]);
    }
  }
  return {rows_out, cols_out, gq, gk};
}

// What one row of the backward's G reads: scales, the row's weights and log-sum-exps, and the
// columns' (c == nullptr: rows only).
template <typename T>
struct GradientRow {
  T ss, ts, g, a, lse_s, lse_t;
  const T *c, *ca, *clse_s, *clse_t;
};

// a e^S - g e^T; without kSplit (a == g, the distillation alone) g (e^S - e^T), one product.
template <typename T, bool kSplit>
FASTCONTRAST_ALWAYS_INLINE T weighted_gap(T es, T et, T a, T g) {
  if constexpr (kSplit) {
    return a * es - g * et;
  } else {
    return g * (es - et);
  }
}

// G of one tile row in place of its student scores s (t: the teacher's), unscaled scores in.
template <typename T, bool kSplit>
FASTCONTRAST_ALWAYS_INLINE void gradient_row(const GradientRow<T>& r, T* s, const T* t,
                                             int64_t m) {
  if (r.c) {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      const T sv = s[j] * r.ss, tv = t[j] * r.ts;
      s[j] = weighted_gap<T, kSplit>(fast_exp(sv - r.lse_s), fast_exp(tv - r.lse_t), r.a, r.g) +
             weighted_gap<T, kSplit>(fast_exp(sv - r.clse_s[j]), fast_exp(tv - r.clse_t[j]),
                                     r.ca[j], r.c[j]);
    }
  } else {
#pragma omp simd
    for (int64_t j = 0; j < m; ++j) {
      s[j] = weighted_gap<T, kSplit>(fast_exp(s[j] * r.ss - r.lse_s),
                                     fast_exp(t[j] * r.ts - r.lse_t), r.a, r.g);
    }
  }
}

template <typename T>
std::tuple<OptTensor, OptTensor> backward_impl(
    const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq, const at::Tensor& tk,
    T ss, T ts, const at::Tensor& row_stats_in, const at::Tensor& row_grad,
    const OptTensor& col_stats_in, const OptTensor& col_grad, const OptTensor& row_student_grad,
    const OptTensor& col_student_grad, bool need_gq, bool need_gk, int64_t requested) {
  const int64_t n = sq.size(0), m = sk.size(0), d = sq.size(1);
  const int64_t block_rows = choose_block_rows(n, m, sizeof(T), requested);
  const int64_t chunk = tiles::chunk_keys(block_rows, sizeof(T), requested);
  OptTensor gq, gk;
  if (need_gq) gq = new_output({n, d}, sq.options());
  if (need_gk) gk = n > 0 ? new_output({m, d}, sq.options()) : at::zeros({m, d}, sq.options());
  const T* lse_s = row_stats_in.data_ptr<T>();
  const T* lse_t = lse_s + n;
  const T* g = row_grad.data_ptr<T>();
  const bool with_cols = col_stats_in.has_value();
  const T* clse_s = with_cols ? col_stats_in->data_ptr<T>() : nullptr;
  const T* clse_t = with_cols ? clse_s + m : nullptr;
  const T* c = with_cols ? col_grad->data_ptr<T>() : nullptr;
  // The weights of P^S (a, ca): the teacher's (g, c) unless given (the combined loss).
  const T* a = row_student_grad ? row_student_grad->data_ptr<T>() : g;
  const T* ca = col_student_grad ? col_student_grad->data_ptr<T>() : c;
  const bool split = row_student_grad.has_value() || col_student_grad.has_value();
  for_each_row_block<T>(
      sq, sk, tq, tk, block_rows, chunk, gk.has_value(),
      [&](int64_t row, T* s, const T* t) {
        const GradientRow<T> r{ss, ts, g[row], a[row], lse_s[row], lse_t[row],
                               c, ca, clse_s, clse_t};
        if (split) {
          gradient_row<T, true>(r, s, t, m);
        } else {
          gradient_row<T, false>(r, s, t, m);
        }
      },
      [&](int64_t r0, int64_t rows, const Tiles& tiles) {
        add_query_gradient(tiles, sk, r0, rows, gq);
      },
      [&](int64_t r0, int64_t rows, const Tiles& tiles, int64_t j0, int64_t j1) {
        add_key_gradient(tiles, sq, r0, rows, j0, j1, gk);
      });
  return {gq, gk};
}

}  // namespace

std::tuple<at::Tensor, OptTensor, OptTensor, OptTensor> distill_forward(
    const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq, const at::Tensor& tk,
    double s_scale, double t_scale, bool with_cols, const OptTensor& row_grad,
    const OptTensor& row_student_grad, bool need_gq, bool need_gk, int64_t block_rows) {
  return AT_DISPATCH_FLOATING_TYPES(sq.scalar_type(), "distill_forward", [&] {
    return forward_impl<scalar_t>(sq, sk, tq, tk, scalar_t(s_scale), scalar_t(t_scale),
                                  with_cols, row_grad, row_student_grad, need_gq, need_gk,
                                  block_rows);
  });
}

std::tuple<OptTensor, OptTensor> distill_backward(
    const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq, const at::Tensor& tk,
    double s_scale, double t_scale, const at::Tensor& row_stats, const at::Tensor& row_grad,
    const OptTensor& col_stats, const OptTensor& col_grad, const OptTensor& row_student_grad,
    const OptTensor& col_student_grad, bool need_gq, bool need_gk, int64_t block_rows) {
  return AT_DISPATCH_FLOATING_TYPES(sq.scalar_type(), "distill_backward", [&] {
    return backward_impl<scalar_t>(sq, sk, tq, tk, scalar_t(s_scale), scalar_t(t_scale),
                                   row_stats, row_grad, col_stats, col_grad, row_student_grad,
                                   col_student_grad, need_gq, need_gk, block_rows);
  });
}

}  // namespace fastcontrast
