// Symmetric-Gram masked log-sum-exp kernels on CPU (see gram.h for the maths and the contract).
//
// Only the tiles on and above the diagonal are computed. Each tile (keys k0 .. k0 + K, queries
// q0 .. q0 + Q) is one ATen GEMM in the transposed layout of infonce.cpp,
// tile[j][i] = <z_{k0+j}, z_{q0+i}>, and an entry of a tile right of the diagonal is an entry of
// both row q0 + i (as a query) and row k0 + j (as a key). The backward turns it into the pair
// weight
//   H_ij = alpha_i beta_j (g_i exp(s_ij - lse_i) + g_j exp(s_ij - lse_j))
// and uses it twice: dz[q0:q0+Q] += H^T @ z[k0:k0+K]   and   dz[k0:k0+K] += H @ z[q0:q0+Q].
// Work: forward N^2 D and backward 3 N^2 D multiply-adds (plus the diagonal blocks' share)
// instead of 2 and 4 N^2 D for the full product.
//
// Two schedules:
// - Pair rounds (the shared-shift forward, every backward): square blocks of B rows
//   (pair_block: ~4 MiB tiles), the block pairs (a < b) in rounds where no block appears twice
//   (round-robin, circle method), so that the tiles of a round update disjoint rows: they run in
//   parallel, one thread and one single-threaded GEMM each, with no reduction between threads and
//   no fork / join inside a tile. The rounds are an order, not barriers (pair_tasks): a thread
//   takes the next tile whose blocks' earlier tiles are done. Each diagonal block of 256 rows or
//   more is three tiles of its halves (3/4 of the block). Measured at 2N = 16384, D = 256 on 2
//   threads: see benchmarks/gram_targets.py.
// - Strips (the exact forward, forward_impl): strip r0 .. r0 + R against rows r0 .. N in chunks of
//   C keys (~2 MiB), parallel inside each chunk, the online max / sum statistics of every row
//   merged chunk after chunk.
//
// Calls whose id mask meets unusable scales (fold_scales) run on the full-product kernels of
// infonce.cpp, which fold the scales into the operands: a rare, non-finite-input path.
#include "cpu/gram.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <utility>
#include <vector>

#include "cpu/fast_exp.h"
#include "cpu/lse_tiles.h"
#include "cpu/outputs.h"
#include "cpu/shared_shift.h"
#include "cpu/tasks.h"

namespace fastcontrast {
namespace {

using namespace tiles;  // NOLINT: the shared pieces (lse_tiles.h)

// Calls fn(r0, rows, c0, p, tile) for each strip r0 and key chunk c0 .. c1 of it (c0 >= r0), p
// the Problem of all rows against the chunk's keys (KeyChunk, lse_tiles.h: key j is row c0 + j;
// its query indices are global, block r0 .. r0 + rows) and tile (c1 - c0, rows) =
// z[c0:c1] @ z[r0:r0+rows]^T with the id-masked entries at -inf; after a strip's last chunk,
// done(r0, rows).
template <typename T, typename Fn, typename Done>
void for_each_chunk(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                    const Mask& mask, int64_t block_rows, int64_t requested, Fn&& fn,
                    Done&& done) {
  const int64_t n = z.size(0);
  const int64_t chunk = chunk_keys(block_rows, sizeof(T), requested);
  at::Tensor buffer = at::empty({chunk * block_rows}, z.options());
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    for (int64_t c0 = r0; c0 < n; c0 += chunk) {
      const int64_t c1 = std::min(n, c0 + chunk);
      const KeyChunk part(z, beta, mask, c0, c1);
      const Problem<T> p(z, part.keys, alpha, part.beta, part.mask, false, block_rows);
      at::Tensor tile = buffer.narrow(0, 0, (c1 - c0) * rows).view({c1 - c0, rows});
      at::mm_out(tile, part.keys, z.narrow(0, r0, rows).t());
      if (p.row_ids) p.mask_equal_ids(r0, rows, tile);
      fn(r0, rows, c0, p, tile);
    }
    done(r0, rows);
  }
}

template <typename T>
int64_t gram_block_rows(const at::Tensor& z, int64_t requested) {
  const int64_t n = z.size(0);
  return choose_block_rows(n, n, z.size(1), sizeof(T), /*large_tile=*/true, requested);
}

// Rounds of block pairs: every pair (a, b), a < b, of `blocks` blocks once, no block twice in a
// round (the circle method of round-robin tournaments; an odd count gets a bye), then the round of
// the diagonal pairs (a, a).
std::vector<std::vector<std::pair<int64_t, int64_t>>> pair_rounds(int64_t blocks) {
  const int64_t m = blocks + (blocks & 1);
  std::vector<int64_t> ring(m);
  std::iota(ring.begin(), ring.end(), int64_t(0));
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  for (int64_t r = 0; r + 1 < m; ++r) {
    std::vector<std::pair<int64_t, int64_t>> round;
    for (int64_t i = 0; i < m / 2; ++i) {
      const int64_t a = ring[i], b = ring[m - 1 - i];
      if (a < blocks && b < blocks) round.emplace_back(std::min(a, b), std::max(a, b));
    }
    if (!round.empty()) rounds.push_back(std::move(round));
    std::rotate(ring.begin() + 1, ring.end() - 1, ring.end());  // ring[0] stays
  }
  std::vector<std::pair<int64_t, int64_t>> diagonal;
  for (int64_t a = 0; a < blocks; ++a) diagonal.emplace_back(a, a);
  rounds.push_back(std::move(diagonal));
  return rounds;
}

// Rows of a pair block: a square tile of ~kPairTileBytes (1024 rows in float32, 720 in float64),
// halved (down to 128) until a round has a pair for every thread; a forced size (tests) as given.
constexpr int64_t kPairTileBytes = int64_t(4) << 20;
constexpr int64_t kMinHalfRows = 128;

inline int64_t pair_block(int64_t n, int64_t elem_size, int64_t requested) {
  if (requested > 0) return std::max<int64_t>(1, std::min(requested, n));
  int64_t b = static_cast<int64_t>(std::sqrt(static_cast<double>(kPairTileBytes / elem_size)));
  b = b / 16 * 16;
  const int64_t threads = at::get_num_threads();
  while (b > 128 && (n + b - 1) / b < 2 * threads) b = std::max<int64_t>(128, b / 2 / 16 * 16);
  return std::max<int64_t>(1, std::min(b, n));
}

// The tasks of pair_rounds (block pairs; (a, a) a diagonal block) in round order into graph
// (tasks.h), with an edge from each block's previous task: every thread takes the first task not
// yet started whose blocks have no earlier task unfinished, without a barrier between rounds. So
// the updates of each block's rows happen in list order whatever thread runs them (deterministic
// sums), tasks of different blocks overlap across rounds, and a thread that finishes early takes
// the next ready task instead of waiting for the round's slowest.
inline std::vector<std::pair<int64_t, int64_t>> pair_tasks(
    const std::vector<std::vector<std::pair<int64_t, int64_t>>>& rounds, int64_t blocks,
    std::unique_ptr<TaskGraph>& graph) {
  std::vector<std::pair<int64_t, int64_t>> tasks;
  for (const auto& round : rounds) tasks.insert(tasks.end(), round.begin(), round.end());
  graph = std::make_unique<TaskGraph>(static_cast<int64_t>(tasks.size()));
  std::vector<int64_t> last(blocks, -1);
  for (int64_t t = 0; t < graph->size(); ++t)
    graph->chain(t, last, {tasks[t].first, tasks[t].second});
  return tasks;
}

// Calls fn(q0, q_rows, k0, k_rows, p, tile) for every tile on and above the diagonal: the block
// pairs (a < b) whole (queries a, keys b), and each diagonal block as three tiles of its halves
// (lo lo, hi hi, lo hi), or as one tile below 2 kMinHalfRows rows. p is the Problem of all rows
// against the tile's keys (KeyChunk: key j is row k0 + j, query indices global) and tile
// (k_rows, q_rows) = z[k0:..] @ z[q0:..]^T with the id-masked entries at -inf, in the calling
// thread's buffer. The tasks run on every thread at once (pair_tasks): no two running tasks share
// a block, and each block's tasks run in the order of pair_rounds; a tile on the diagonal has
// q0 == k0. Before a block's first tile, in the same task, first_touch(r0, rows) with the block's
// rows (the backward zeroes its accumulator there: no parallel ATen op before the region).
template <typename T, typename Fn, typename FirstTouch>
void for_each_pair_tile(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                        const Mask& mask, int64_t block, int64_t requested, Fn&& fn,
                        FirstTouch&& first_touch) {
  const int64_t n = z.size(0), blocks = (n + block - 1) / block;
  std::vector<char> touched(static_cast<size_t>(blocks), 0);  // a block's tasks run in order
  const int64_t threads = at::get_num_threads();
  std::vector<at::Tensor> buffers(static_cast<size_t>(threads));
  const auto tile_of = [&](int64_t q0, int64_t q_rows, int64_t k0, int64_t k_rows) {
    at::Tensor& buffer = buffers[static_cast<size_t>(at::get_thread_num())];
    if (!buffer.defined()) buffer = at::empty({block * block}, z.options());
    const KeyChunk part(z, beta, mask, k0, k0 + k_rows);
    const Problem<T> p(z, part.keys, alpha, part.beta, part.mask, false, block);
    at::Tensor tile = buffer.narrow(0, 0, k_rows * q_rows).view({k_rows, q_rows});
    at::mm_out(tile, part.keys, z.narrow(0, q0, q_rows).t());
    if (p.row_ids) p.mask_equal_ids(q0, q_rows, tile);
    fn(q0, q_rows, k0, k_rows, p, tile);
  };
  const auto run = [&](int64_t a, int64_t b) {
    for (const int64_t k : {a, b}) {
      if (touched[k]) continue;
      touched[k] = 1;
      first_touch(k * block, std::min(block, n - k * block));
    }
    const int64_t a0 = a * block, a_rows = std::min(block, n - a0);
    if (a != b) {
      tile_of(a0, a_rows, b * block, std::min(block, n - b * block));
      return;
    }
    // Halves of fewer than kMinHalfRows rows gain little and round differently from one
    // tile (a forced block size, in the tests, splits down to single rows).
    const int64_t h = a_rows / 2;
    if (h == 0 || (requested <= 0 && h < kMinHalfRows)) {
      tile_of(a0, a_rows, a0, a_rows);
      return;
    }
    tile_of(a0, h, a0, h);
    tile_of(a0 + h, a_rows - h, a0 + h, a_rows - h);
    tile_of(a0, h, a0 + h, a_rows - h);
  };
  std::unique_ptr<TaskGraph> graph;
  const auto tasks = pair_tasks(pair_rounds(blocks), blocks, graph);
  graph->run([&](int64_t t, int64_t) { run(tasks[t].first, tasks[t].second); });
}

// Per-query log-sum-exp of a strip merged chunk after chunk (online, as a column's): running
// max m (NaN skipped) and sum l = sum exp(s - m). An unmasked NaN makes l NaN while m is finite;
// once m is +inf, l is NaN anyway (exp(inf - inf)), so nan records whether the row has a NaN.
template <typename T>
struct RowStats {
  std::vector<T> max, chunk_max;
  std::vector<Acc> sum, chunk_sum;
  std::vector<char> nan;
  explicit RowStats(int64_t r) : max(r), chunk_max(r), sum(r), chunk_sum(r), nan(r) {}
  void reset(int64_t rows) {
    std::fill(max.begin(), max.begin() + rows, -kInf<T>);
    std::fill(sum.begin(), sum.begin() + rows, Acc(0));
    std::fill(nan.begin(), nan.begin() + rows, 0);
  }
  T lse(int64_t i) const {
    if (max[i] == kInf<T>) return nan[i] ? kNaN<T> : kInf<T>;
    return lse_from(safe_shift(max[i]), sum[i]);
  }
};

template <typename T>
at::Tensor forward_impl(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                        const Mask& mask, int64_t requested) {
  const int64_t n = z.size(0), block_rows = gram_block_rows<T>(z, requested);
  at::Tensor row_lse = new_output({n}, z.options());
  T* out = row_lse.data_ptr<T>();
  ColumnStats<T> cols(n);  // row k's entries with the rows of earlier strips
  Partials<T> partial(block_rows);
  Partials<Acc> partial_sums(block_rows);
  RowStats<T> rs(block_rows);
  std::vector<T> shift(block_rows);

  for_each_chunk<T>(z, alpha, beta, mask, block_rows, requested,
                    [&](int64_t r0, int64_t rows, int64_t c0, const Problem<T>& p,
                        at::Tensor& tile) {
    if (c0 == r0) rs.reset(rows);
    const T* a = p.alpha + r0;
    partial.reset(rows, -kInf<T>);
    p.for_each_tile_row(r0, rows, tile, [&](int64_t j, const T* x, int64_t cut) {
      T* mx = partial.slot();
      const T b = p.beta[j];
      if (c0 + j >= r0 + rows) {  // right of the diagonal block: row c0 + j's statistics too
        cols.merge(c0 + j, mx, x, a, b, cut, rows);
      } else {
        max_into(mx, x, a, b, 0, cut);
        max_into(mx, x, a, b, cut + 1, rows);
      }
    });
    partial.combine_max(rs.chunk_max.data());
    for (int64_t i = 0; i < rows; ++i) {
      const T old = rs.max[i];
      const T mx = std::max(old, rs.chunk_max[i]);
      if (mx == kInf<T> && old != kInf<T>)  // NaN seen so far (while the max was finite)
        rs.nan[i] = std::isnan(rs.sum[i]);
      shift[i] = safe_shift(mx);
      // Rescale the running sum to the new shift (no-op while the max is -inf: the sum is 0).
      if (mx != old && old != -kInf<T>) rs.sum[i] *= fast_exp(old - shift[i]);
      rs.max[i] = mx;
    }
    block_sums(p, r0, rows, tile, partial_sums, shift.data(), rs.chunk_sum.data());
    for (int64_t i = 0; i < rows; ++i) {
      rs.sum[i] += rs.chunk_sum[i];
      if (rs.max[i] == kInf<T> && !rs.nan[i]) rs.nan[i] = p.query_has_nan(r0, rows, tile, i);
    }
  }, [&](int64_t r0, int64_t rows) {
    for (int64_t i = 0; i < rows; ++i) out[r0 + i] = log_add_exp(rs.lse(i), cols.lse(r0 + i));
  });
  return row_lse;
}

// The shared-shift forward (shared_shift.h): one exp per entry, e_ij = exp(s_ij - c), feeds both
// its row's and its column's sum S_k = sum_j exp(s_kj - c), and lse_k = c + log S_k: no max pass,
// no rescaling, half the exps of forward_impl. Returns false, and the caller runs forward_impl,
// when c is not finite or some row's sum is below kMinSharedShiftSum; such calls pay for both.
template <typename T>
bool shared_shift_forward(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                          const Mask& mask, int64_t requested, T* out) {
  const SharedShift<T> shift = shared_shift<T>(z, z, alpha, beta);
  if (!shift.usable) return false;
  const int64_t n = z.size(0);
  std::vector<Acc> sum(n, Acc(0));
  for_each_pair_tile<T>(z, alpha, beta, mask, pair_block(n, sizeof(T), requested), requested,
                        [&](int64_t q0, int64_t q_rows, int64_t k0, int64_t k_rows,
                            const Problem<T>& p, at::Tensor& tile) {
    const T* a = p.alpha + q0;
    const T* base = tile.data_ptr<T>();
    FlushedSums<T> row_sum(sum.data() + q0, q_rows);
    for (int64_t j = 0; j < k_rows; ++j) {
      const T* x = base + j * q_rows;
      const int64_t cut = p.cut(j, q0, q_rows);
      const T b = p.beta[j];
      const T col = shared_shift_sums_into(row_sum.data(), x, a, b, shift.exp_shift, 0, cut) +
                    shared_shift_sums_into(row_sum.data(), x, a, b, shift.exp_shift, cut + 1,
                                           q_rows);
      row_sum.row_done();
      if (k0 != q0) sum[k0 + j] += col;  // off the diagonal: row k0 + j's entry too
    }
    row_sum.flush();
  }, [](int64_t, int64_t) {});
  if (!shared_sums_usable<T>(sum.data(), n)) return false;
  for (int64_t k = 0; k < n; ++k) out[k] = shared_lse<T>(shift.c, sum[k]);
  return true;
}

// The shared-shift pair weight: with c the shift of the forward (shared_shift),
// H_ij = alpha_i beta_j exp(s_ij - c) (w_i + w_j) with w_k = g_k exp(c - lse_k)
// (shared_shift_weights), one exp per entry instead of two. Fills w and the shift; false (the
// exact two-exp weights then) where c is not finite or the weights cannot be shared.
template <typename T>
bool gram_shared_weights(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                         const T* lse, const T* g, std::vector<T>& w, SharedShift<T>& shift) {
  shift = shared_shift<T>(z, z, alpha, beta);
  return shift.usable && shared_shift_weights(shift.c, lse, g, z.size(0), w);
}

template <typename T>
at::Tensor backward_impl(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                         const at::Tensor& row_lse, const at::Tensor& row_grad, const Mask& mask,
                         int64_t requested) {
  const int64_t n = z.size(0);
  at::Tensor dz = new_output({n, z.size(1)}, z.options());  // accumulated, zeroed by first_touch
  const T* lse_in = row_lse.data_ptr<T>();
  const T* g = row_grad.data_ptr<T>();
  std::vector<T> rl(n);
  for (int64_t k = 0; k < n; ++k) rl[k] = finite_or_inf(lse_in[k]);
  // exp(-inf - NaN) and non-finite g * exp(-inf) are NaN: a NaN lse or a non-finite upstream
  // gradient of a tile's row leaks into the tile's id-masked entries, zeroed again then.
  std::vector<int64_t> poisoned(n + 1, 0);  // prefix counts
  for (int64_t k = 0; k < n; ++k)
    poisoned[k + 1] = poisoned[k] + (std::isnan(lse_in[k]) || !std::isfinite(g[k]));
  const auto any_poisoned = [&](int64_t k0, int64_t rows) {
    return poisoned[k0 + rows] > poisoned[k0];
  };
  std::vector<T> w;
  SharedShift<T> shift{};
  const bool shared = shared_shift_enabled() &&
                      gram_shared_weights<T>(z, alpha, beta, lse_in, g, w, shift);

  for_each_pair_tile<T>(z, alpha, beta, mask, pair_block(n, sizeof(T), requested), requested,
                        [&](int64_t q0, int64_t q_rows, int64_t k0, int64_t k_rows,
                            const Problem<T>& p, at::Tensor& tile) {
    const T* a = p.alpha + q0;
    const T* gi = g + q0;
    const T* li = rl.data() + q0;
    const T* wi = shared ? w.data() + q0 : nullptr;
    T* base = tile.data_ptr<T>();
    for (int64_t j = 0; j < k_rows; ++j) {
      T* x = base + j * q_rows;
      const T b = p.beta[j];
      if (shared) {
        const T wj = w[k0 + j];
#pragma omp simd
        for (int64_t i = 0; i < q_rows; ++i)
          x[i] = a[i] * b * fast_exp_shifted(x[i] * a[i] * b, shift.exp_shift) * (wi[i] + wj);
      } else {
        const T gj = g[k0 + j], lj = rl[k0 + j];
#pragma omp simd
        for (int64_t i = 0; i < q_rows; ++i) {
          const T s = x[i] * a[i] * b;  // rounded as in the forward: exp(s - lse) consistent
          x[i] = a[i] * b * (gi[i] * fast_exp(s - li[i]) + gj * fast_exp(s - lj));
        }
      }
      const int64_t cut = p.cut(j, q0, q_rows);
      if (cut < q_rows) x[cut] = T(0) * a[cut] * b;  // H = alpha beta dS: NaN where a scale is
    }
    if (p.row_ids && (any_poisoned(q0, q_rows) || any_poisoned(k0, k_rows)))
      p.mask_equal_ids(q0, q_rows, tile, T(0));
    // The tile's queries get its keys; off the diagonal its keys get its queries (a tile on the
    // diagonal is symmetric: used once).
    dz.narrow(0, q0, q_rows).addmm_(tile.t(), p.keys);
    if (k0 != q0) dz.narrow(0, k0, k_rows).addmm_(tile, z.narrow(0, q0, q_rows));
  }, [&](int64_t r0, int64_t rows) { dz.narrow(0, r0, rows).zero_(); });
  return dz;
}

}  // namespace

at::Tensor gram_lse_forward(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                            const Mask& mask, int64_t block_rows) {
  if (fold_scales(z, z, alpha, beta, mask).folded)
    return std::get<0>(masked_lse_forward(z, z, alpha, beta, mask, false, block_rows));
  return AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gram_lse_forward", [&] {
    if (shared_shift_enabled()) {
      at::Tensor row_lse = new_output({z.size(0)}, z.options());
      if (shared_shift_forward<scalar_t>(z, alpha, beta, mask, block_rows,
                                         row_lse.data_ptr<scalar_t>()))
        return row_lse;
    }
    return forward_impl<scalar_t>(z, alpha, beta, mask, block_rows);
  });
}

at::Tensor gram_lse_backward(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                             const at::Tensor& row_lse, const at::Tensor& row_grad,
                             const Mask& mask, int64_t block_rows) {
  if (fold_scales(z, z, alpha, beta, mask).folded) {
    auto grads = masked_lse_backward(z, z, alpha, beta, row_lse, row_grad, std::nullopt,
                                     std::nullopt, mask, true, true, block_rows);
    return std::get<0>(grads)->add_(*std::get<1>(grads));
  }
  return AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gram_lse_backward", [&] {
    return backward_impl<scalar_t>(z, alpha, beta, row_lse, row_grad, mask, block_rows);
  });
}

}  // namespace fastcontrast
