// Fused masked log-sum-exp kernels on CPU (see infonce.h for the maths and the contract).
//
// Queries are processed in blocks of R rows (r0 .. r0 + R). Per block, one score tile in the
// transposed layout, keys x queries:
//   1. tile = keys @ q[r0:r0+R]^T              (M x R, one ATen GEMM, MKL-threaded)
//      tile[j][i] = <keys_j, q_{r0+i}>,  s_ij = tile[j][i] * alpha_i * beta_j
//   2. fused elementwise passes over the tile rows (one key each), the keys split across threads
//      and every loop vectorised over the R queries of a tile row: per-query max, then
//      exp(s_ij - max_i) summed into per-query sums (per-thread partials, combined after the
//      pass) and/or written back over the tile as the gradient weight.
//   3. gradient GEMMs on the weights W (M x R) with a per-query scale c_i:
//        dq[r0:r0+R] = c * (W^T @ keys)        dkeys += W @ (c * q[r0:r0+R])
//
// The gradient is split as H_ij = dS_ij alpha_i beta_j = c_i * W_ji with W carrying beta_j, so
// that dq_i = sum_j H_ij keys_j and dkeys_j = sum_i H_ij q_i need no scaled copy of keys and no
// extra pass over the tile: the query factor c_i is applied to the small R x D operands.
//
// Why keys x queries: with MKL on 2 cores (N = M = 16384, D = 256, fp32) keys @ q_blk^T ran
// 10-15% faster than q_blk @ keys^T, and the two gradient products equally fast in either layout;
// column statistics (the symmetric loss) become contiguous reductions over a tile row.
// The masked entry of a tile row (query j - diag_offset) is skipped by splitting the query range
// in two, so that no loop tests a mask per element; entries masked by equal ids are set to -inf in
// the tile right after its GEMM (Problem::mask_equal_ids). Everything accumulates in the input dtype.
#include "cpu/infonce.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu/fast_exp.h"
#include "cpu/outputs.h"

namespace fastcontrast {
namespace {

// Tile budget of the gradient kernels: at least kMinTileBytes, or half the size of q and keys
// together when that is larger (dq and dkeys alone take that much, so the tile stays a fraction of
// the memory the call needs anyway, while large problems get the taller tiles that keep the GEMMs
// efficient). The forward alone returns only O(N + M) values, and the symmetric (column-term)
// backward is not the memory-critical fused path: their tiles may be twice as large.
constexpr int64_t kMinTileBytes = int64_t(16) << 20;
constexpr int64_t kMinBlockRows = 32;
constexpr int64_t kMaxBlockRows = 512;
constexpr int64_t kElemsPerTask = 16384;  // parallel grain of the elementwise passes

template <typename T>
constexpr T kInf = std::numeric_limits<T>::infinity();
template <typename T>
constexpr T kNaN = std::numeric_limits<T>::quiet_NaN();

// R: the tile budget over the size of one query's column, in [kMinBlockRows, kMaxBlockRows], a
// multiple of 16 (GEMM-friendly), never more than N. Measured on N = M = 16384, D = 256 fp32
// (2 cores): the three GEMMs run at ~100 / 120 / 130 GFLOP/s for R = 128 / 256 / 512 and the
// elementwise passes add a few percent; R = 256 there (16 MiB tile), 512 for the forward alone.
int64_t choose_block_rows(int64_t n, int64_t m, int64_t d, int64_t elem_size, bool large_tile,
                          int64_t requested) {
  int64_t b = requested;
  if (b <= 0) {
    int64_t budget = std::max(kMinTileBytes, (n + m) * d * elem_size / 2);
    if (large_tile) budget *= 2;
    b = budget / std::max<int64_t>(m * elem_size, 1);
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
template <typename T>
T lse_from(T shift, T sum) { return shift == kInf<T> ? kInf<T> : shift + std::log(sum); }

// An lse of -inf contributes 0 to a gradient: exp(s - (+inf)) = 0 where exp(s - (-inf)) is not.
template <typename T>
T finite_or_inf(T lse) { return lse == -kInf<T> ? kInf<T> : lse; }

template <typename T>
bool any_nan(const T* s, int64_t r) {
  for (int64_t i = 0; i < r; ++i)
    if (std::isnan(s[i])) return true;
  return false;
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
template <typename T>
void sum_exp_into(T* sum, const T* x, const T* a, T b, const T* shift, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) sum[i] += fast_exp(x[i] * a[i] * b - shift[i]);
}

// As sum_exp_into, and x_i <- b * exp(s_i - shift_i): the gradient weight overwrites the tile.
template <typename T>
void exp_weights_into(T* sum, T* x, const T* a, T b, const T* shift, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const T e = fast_exp(x[i] * a[i] * b - shift[i]);
    sum[i] += e;
    x[i] = e * b;
  }
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
T sum_exp(const T* s, T shift, int64_t r) {
  T sum = 0;
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

// dq[r0:r0+rows] = c * (W^T @ keys) and dkeys += W @ (c * q[r0:r0+rows]), c = row_scale.
template <typename T>
void accumulate_grads(const Problem<T>& p, int64_t r0, int64_t rows, const at::Tensor& weights,
                      const at::Tensor& row_scale, std::optional<at::Tensor>& dq,
                      std::optional<at::Tensor>& dkeys, at::Tensor& scaled_q) {
  const at::Tensor c = row_scale.narrow(0, r0, rows).unsqueeze(1);
  if (dq) {
    at::Tensor dq_block = dq->narrow(0, r0, rows);
    at::mm_out(dq_block, weights.t(), p.keys);
    dq_block.mul_(c);
  }
  if (dkeys) {
    at::Tensor q_block = scaled_q.narrow(0, 0, rows);
    at::mul_out(q_block, p.q.narrow(0, r0, rows), c);
    dkeys->addmm_(weights, q_block);
  }
}

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

template <typename T>
std::tuple<at::Tensor, std::optional<at::Tensor>> forward_impl(const Problem<T>& p, bool with_col) {
  at::Tensor row_lse = new_output({p.n}, p.q.options());
  T* out = row_lse.data_ptr<T>();
  // Running per-key (max, sum) of the column log-sum-exp, merged block after block.
  std::vector<T> col_max(with_col ? p.m : 0, -kInf<T>);
  std::vector<T> col_sum(with_col ? p.m : 0, T(0));
  // Per key: an unmasked NaN score seen once its max is +inf (the sum cannot tell them apart
  // from then on). char, not bool: threads write different keys concurrently.
  std::vector<char> col_nan(with_col ? p.m : 0, 0);
  Partials<T> partial(p.block_rows);
  std::vector<T> shift(p.block_rows), sum(p.block_rows);

  p.for_each_block([&](int64_t r0, int64_t rows, at::Tensor& tile) {
    const T* a = p.alpha + r0;
    if (with_col) {
      // One pass: per-query maxima, and each key's column statistics while its row is in L1.
      partial.reset(rows, -kInf<T>);
      p.for_each_tile_row(r0, rows, tile, [&](int64_t j, const T* x, int64_t cut) {
        thread_local std::vector<T> sbuf;
        sbuf.resize(rows);
        T* mx = partial.slot();
        const T b = p.beta[j];
        const T row_max = std::max(scores_max_into(sbuf.data(), mx, x, a, b, 0, cut),
                                   scores_max_into(sbuf.data(), mx, x, a, b, cut + 1, rows));
        if (cut < rows) sbuf[cut] = -kInf<T>;
        if (row_max == kInf<T> || col_max[j] == kInf<T>) {  // rare: the lse is +inf or NaN
          col_nan[j] = col_nan[j] || std::isnan(col_sum[j]) || any_nan(sbuf.data(), rows);
          col_max[j] = kInf<T>;
          return;
        }
        const T new_max = std::max(col_max[j], row_max);
        const T s = safe_shift(new_max);
        col_sum[j] = col_sum[j] * fast_exp(col_max[j] - s) + sum_exp(sbuf.data(), s, rows);
        col_max[j] = new_max;
      });
      partial.combine_max(shift.data());
      for (int64_t i = 0; i < rows; ++i) shift[i] = safe_shift(shift[i]);
    } else {
      block_shift(p, r0, rows, tile, partial, shift.data());
    }
    partial.reset(rows, T(0));
    p.for_each_tile_row(r0, rows, tile, [&](int64_t j, const T* x, int64_t cut) {
      T* acc = partial.slot();
      sum_exp_into(acc, x, a, p.beta[j], shift.data(), 0, cut);
      sum_exp_into(acc, x, a, p.beta[j], shift.data(), cut + 1, rows);
    });
    partial.combine_sum(sum.data());
    for (int64_t i = 0; i < rows; ++i) {
      const bool nan = shift[i] == kInf<T> && p.query_has_nan(r0, rows, tile, i);
      out[r0 + i] = nan ? kNaN<T> : lse_from(shift[i], sum[i]);
    }
  });

  std::optional<at::Tensor> col_lse;
  if (with_col) {
    col_lse = new_output({p.m}, p.q.options());
    T* c = col_lse->data_ptr<T>();
    for (int64_t j = 0; j < p.m; ++j)
      c[j] = col_nan[j] ? kNaN<T> : lse_from(safe_shift(col_max[j]), col_sum[j]);
  }
  return {row_lse, col_lse};
}

template <typename T>
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> backward_impl(
    const Problem<T>& p, const at::Tensor& row_lse, const at::Tensor& row_grad,
    const std::optional<at::Tensor>& col_lse, const std::optional<at::Tensor>& col_grad,
    bool need_dq, bool need_dkeys) {
  std::optional<at::Tensor> dq, dkeys;
  if (need_dq) dq = new_output({p.n, p.d}, p.q.options());
  if (need_dkeys) dkeys = at::zeros({p.m, p.d}, p.q.options());  // accumulated
  if (!need_dq && !need_dkeys) return {dq, dkeys};

  std::vector<T> rl(p.n);
  const T* rl_in = row_lse.data_ptr<T>();
  for (int64_t i = 0; i < p.n; ++i) rl[i] = finite_or_inf(rl_in[i]);
  const T* rg = row_grad.data_ptr<T>();
  const T* cl = col_lse ? col_lse->data_ptr<T>() : nullptr;
  const T* cg = col_grad ? col_grad->data_ptr<T>() : nullptr;
  at::Tensor scaled_q = at::empty({need_dkeys ? p.block_rows : 0, p.d}, p.q.options());
  // exp(-inf - NaN) and non-finite g * exp(-inf) are NaN: a NaN lse or a non-finite upstream
  // gradient would leak into the id-masked entries, which are zeroed again then (rare).
  const auto poisons = [](T lse, T grad) { return std::isnan(lse) || !std::isfinite(grad); };
  bool cols_poisoned = false;
  for (int64_t j = 0; cl && j < p.m; ++j) cols_poisoned = cols_poisoned || poisons(cl[j], cg[j]);

  p.for_each_block([&](int64_t r0, int64_t rows, at::Tensor& tile) {
    const T* a = p.alpha + r0;
    const T* g = rg + r0;
    bool poisoned = cols_poisoned;
    for (int64_t i = 0; i < rows; ++i) poisoned = poisoned || poisons(rl_in[r0 + i], g[i]);
    const T* lse = rl.data() + r0;
    // W_ji = beta_j dS_ij, s recomputed from the raw tile; 0 for the masked query.
    p.for_each_tile_row(r0, rows, tile, [&](int64_t j, T* x, int64_t cut) {
      const T b = p.beta[j];
      if (cl) {
        const T cg_j = cg[j], cl_j = finite_or_inf(cl[j]);
#pragma omp simd
        for (int64_t i = 0; i < rows; ++i) {
          const T s = x[i] * a[i] * b;
          x[i] = b * (g[i] * fast_exp(s - lse[i]) + cg_j * fast_exp(s - cl_j));
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < rows; ++i) x[i] = b * g[i] * fast_exp(x[i] * a[i] * b - lse[i]);
      }
      if (cut < rows) x[cut] = T(0) * b;  // W = beta_j dS: NaN where beta_j is
    });
    if (poisoned && p.row_ids) p.mask_equal_ids(r0, rows, tile, T(0));
    accumulate_grads(p, r0, rows, tile, p.alpha_tensor, dq, dkeys, scaled_q);
  });
  return {dq, dkeys};
}

template <typename T>
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> forward_with_grad_impl(
    const Problem<T>& p, const at::Tensor& row_grad, const std::optional<at::Tensor>& extra_lse,
    bool need_dq, bool need_dkeys) {
  at::Tensor row_lse = new_output({p.n}, p.q.options());
  at::Tensor row_scale = at::empty({p.n}, p.q.options());
  std::optional<at::Tensor> dq, dkeys;
  if (need_dq) dq = new_output({p.n, p.d}, p.q.options());
  if (need_dkeys) dkeys = at::zeros({p.m, p.d}, p.q.options());  // accumulated
  const bool need_grad = need_dq || need_dkeys;

  T* lse_out = row_lse.data_ptr<T>();
  T* c = row_scale.data_ptr<T>();
  const T* rg = row_grad.data_ptr<T>();
  const T* extra = extra_lse ? extra_lse->data_ptr<T>() : nullptr;
  at::Tensor scaled_q = at::empty({need_dkeys ? p.block_rows : 0, p.d}, p.q.options());
  Partials<T> partial(p.block_rows);
  std::vector<T> shift(p.block_rows), sum(p.block_rows);
  std::vector<char> inf_nan(p.block_rows);
  std::vector<int64_t> nan_rows;

  p.for_each_block([&](int64_t r0, int64_t rows, at::Tensor& tile) {
    const T* a = p.alpha + r0;
    block_shift(p, r0, rows, tile, partial, shift.data());
    // Queries with a +inf entry: whether they also have a NaN one, before W overwrites the tile.
    for (int64_t i = 0; i < rows; ++i)
      inf_nan[i] = shift[i] == kInf<T> && p.query_has_nan(r0, rows, tile, i);
    // W_ji = beta_j exp(s_ij - shift_i) over the tile, and the per-query sums of the exps.
    partial.reset(rows, T(0));
    p.for_each_tile_row(r0, rows, tile, [&](int64_t j, T* x, int64_t cut) {
      T* acc = partial.slot();
      if (need_grad) {
        exp_weights_into(acc, x, a, p.beta[j], shift.data(), 0, cut);
        exp_weights_into(acc, x, a, p.beta[j], shift.data(), cut + 1, rows);
        if (cut < rows) x[cut] = T(0) * p.beta[j];  // NaN where beta_j is
      } else {
        sum_exp_into(acc, x, a, p.beta[j], shift.data(), 0, cut);
        sum_exp_into(acc, x, a, p.beta[j], shift.data(), cut + 1, rows);
      }
    });
    partial.combine_sum(sum.data());
    nan_rows.clear();
    for (int64_t i = 0; i < rows; ++i) {
      T lse = inf_nan[i] ? kNaN<T> : lse_from(shift[i], sum[i]);
      if (extra) lse = log_add_exp(lse, extra[r0 + i]);
      lse_out[r0 + i] = lse;
      // H_ij = g_i alpha_i beta_j exp(s_ij - lse_i) = c_i W_ji, W_ji = beta_j exp(s_ij - shift_i)
      // (shift = lse = +inf: exp(shift - lse) is 1, W already has the NaN of exp(inf - inf)).
      const T g = rg[r0 + i];
      if (lse == -kInf<T>) {
        c[r0 + i] = T(0);  // no candidate: W is 0 throughout
      } else if (std::isnan(lse) || std::isnan(g)) {
        c[r0 + i] = a[i];  // H_ij = NaN where unmasked, 0 where masked: written into W below
        nan_rows.push_back(i);
      } else {
        c[r0 + i] = g * a[i] * (shift[i] == lse ? T(1) : std::exp(shift[i] - lse));
      }
    }
    if (!need_grad) return;
    // Rare: rows whose every unmasked H_ij is NaN (O(M) each).
    T* w = tile.data_ptr<T>();
    for (const int64_t i : nan_rows)
      for (int64_t j = 0; j < p.m; ++j)
        w[j * rows + i] = p.masked(r0 + i, j) ? T(0) * p.beta[j] : kNaN<T>;
    accumulate_grads(p, r0, rows, tile, row_scale, dq, dkeys, scaled_q);
  });
  return {row_lse, dq, dkeys};
}

// Masking by ids writes -inf into the raw products, which the passes then scale by alpha_i beta_j:
// a scale that is NaN, 0 or infinite (non-finite inputs under normalisation) would make a masked
// entry NaN. Such calls, and only those, run on the scaled operands alpha q, beta keys with unit
// scales, and the gradients are scaled back (dq = alpha dq', dkeys = beta dkeys': exact).
struct Operands {
  at::Tensor q, keys, alpha, beta;
  bool folded;
};

Operands fold_scales(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                     const at::Tensor& beta, const Mask& mask) {
  const auto usable = [](const at::Tensor& s) {
    return (s > 0).logical_and(s.isfinite()).all().item<bool>();
  };
  if (!mask.row_ids || (usable(alpha) && usable(beta))) return {q, keys, alpha, beta, false};
  return {q * alpha.unsqueeze(1), keys * beta.unsqueeze(1), at::ones_like(alpha),
          at::ones_like(beta), true};
}

void unfold(const Operands& ops, std::optional<at::Tensor>& grad, const at::Tensor& scale) {
  if (ops.folded && grad) grad->mul_(scale.unsqueeze(1));
}

}  // namespace

std::tuple<at::Tensor, std::optional<at::Tensor>> masked_lse_forward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const Mask& mask, bool with_col_lse, int64_t block_rows) {
  const Operands ops = fold_scales(q, keys, alpha, beta, mask);
  return AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_lse_forward", [&] {
    const Problem<scalar_t> p(ops.q, ops.keys, ops.alpha, ops.beta, mask, /*large_tile=*/true,
                              block_rows);
    return forward_impl(p, with_col_lse);
  });
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> masked_lse_backward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const at::Tensor& row_lse, const at::Tensor& row_grad, const std::optional<at::Tensor>& col_lse,
    const std::optional<at::Tensor>& col_grad, const Mask& mask, bool need_dq, bool need_dkeys,
    int64_t block_rows) {
  const Operands ops = fold_scales(q, keys, alpha, beta, mask);
  auto grads = AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_lse_backward", [&] {
    const Problem<scalar_t> p(ops.q, ops.keys, ops.alpha, ops.beta, mask, /*large_tile=*/col_lse.has_value() || (!need_dq && !need_dkeys), block_rows);
    return backward_impl(p, row_lse, row_grad, col_lse, col_grad, need_dq, need_dkeys);
  });
  unfold(ops, std::get<0>(grads), alpha);
  unfold(ops, std::get<1>(grads), beta);
  return grads;
}

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>
masked_lse_forward_with_grad(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                             const at::Tensor& beta, const at::Tensor& row_grad, const Mask& mask,
                             const std::optional<at::Tensor>& extra_lse, bool need_dq,
                             bool need_dkeys, int64_t block_rows) {
  const Operands ops = fold_scales(q, keys, alpha, beta, mask);
  auto out = AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_lse_forward_with_grad", [&] {
    const Problem<scalar_t> p(ops.q, ops.keys, ops.alpha, ops.beta, mask, /*large_tile=*/!need_dq && !need_dkeys, block_rows);
    return forward_with_grad_impl(p, row_grad, extra_lse, need_dq, need_dkeys);
  });
  unfold(ops, std::get<1>(out), alpha);
  unfold(ops, std::get<2>(out), beta);
  return out;
}

}  // namespace fastcontrast
