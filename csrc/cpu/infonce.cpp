// Fused masked log-sum-exp kernels on CPU (see infonce.h for the maths and the contract).
//
// Queries are processed in blocks of R rows (r0 .. r0 + R), keys in chunks of C. A score tile is
// in the transposed layout, keys x queries:
//   1. tile = keys[chunk] @ q[r0:r0+R]^T       (one ATen GEMM)
//      tile[j][i] = <keys_j, q_{r0+i}>,  s_ij = tile[j][i] * alpha_i * beta_j
//   2. fused elementwise passes over the tile rows (one key each), every loop vectorised over the
//      R queries of a tile row: exp(s_ij - shift) summed into per-query (and per-key) sums and/or
//      written back over the tile as the gradient weight.
//   3. gradient GEMMs on the weights W with a per-query scale c_i:
//        dq[r0:r0+R] += W^T @ keys[chunk]  (scaled by c at the end)   dkeys[chunk] += W @ (c q_blk)
//
// The gradient is split as H_ij = dS_ij alpha_i beta_j = c_i * W_ji with W carrying beta_j, so
// that dq_i = sum_j H_ij keys_j and dkeys_j = sum_i H_ij q_i need no scaled copy of keys and no
// extra pass over the tile: the query factor c_i is applied to the small R x D operands.
//
// Scheduling (tasks.h): the tiles (block, chunk) of the shared-shift forward and of the backward
// are tasks of one parallel region, each run by one thread with single-threaded GEMMs, the tiles
// of a block (of a chunk) in a fixed order; the one-pass forward with gradient has one task per
// block (its whole row, for the row max) and one per (block, chunk) for the dkeys update. So no
// barrier separates the passes and a thread that the OS deschedules holds up only the tasks that
// wait for its tile.
//
// Why keys x queries: with MKL on 2 cores (N = M = 16384, D = 256, fp32) keys @ q_blk^T ran
// 10-15% faster than q_blk @ keys^T, and the two gradient products equally fast in either layout;
// column statistics (the symmetric loss) become contiguous reductions over a tile row.
// The masked entry of a tile row (query j - diag_offset) is skipped by splitting the query range
// in two, so that no loop tests a mask per element; entries masked by equal ids are set to -inf in
// the tile right after its GEMM (Problem::mask_equal_ids). The exps are in the input dtype, their
// sums in double (lse_tiles.h).
#include "cpu/infonce.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/fast_exp.h"
#include "cpu/lse_tiles.h"
#include "cpu/outputs.h"
#include "cpu/tasks.h"

namespace fastcontrast {
namespace {

using namespace tiles;  // NOLINT: the shared pieces (lse_tiles.h, tasks.h)

// Rows per query block of the task kernels: the Problem's R (the tile budget), halved while
// there are fewer than two blocks per thread to share out (down to kMinBlockRows); a forced size
// (tests) as given.
int64_t task_rows(int64_t n, int64_t r, int64_t requested) {
  if (requested > 0) return r;
  const int64_t threads = at::get_num_threads();
  while (r > kMinBlockRows && (n + r - 1) / r < 2 * threads)
    r = std::max<int64_t>(kMinBlockRows, r / 2 / 16 * 16);
  return r;
}

template <typename T>
int64_t task_block_rows(const Problem<T>& p, int64_t requested) {
  return task_rows(p.n, p.block_rows, requested);
}

// Calls fn(r0, rows, c0, pc, tile, slot) for every tile of R queries by C keys as a task
// (tasks.h; grid_order, the tiles of a block and of a chunk chained in that order): pc the
// Problem of the queries against the chunk's keys (KeyChunk: key j is key c0 + j; query indices
// global), tile (c1 - c0, rows) = keys[c0:c1] @ q[r0:r0+rows]^T with the id-masked entries at
// -inf, in the buffer of the calling thread (slot).
template <typename T, typename Fn>
void for_each_grid_tile(const Problem<T>& p, const at::Tensor& beta, const Mask& mask,
                        int64_t block_rows, int64_t chunk, Fn&& fn) {
  const int64_t nb = (p.n + block_rows - 1) / block_rows, nc = (p.m + chunk - 1) / chunk;
  const auto order = grid_order(nb, nc);
  TaskGraph graph(static_cast<int64_t>(order.size()));
  std::vector<int64_t> last(nb + nc, -1);
  for (int64_t t = 0; t < graph.size(); ++t)
    graph.chain(t, last, {order[t].first, nb + order[t].second});
  std::vector<at::Tensor> buffers(static_cast<size_t>(at::get_num_threads()));
  graph.run([&](int64_t t, int64_t slot) {
    const int64_t r0 = order[t].first * block_rows, rows = std::min(block_rows, p.n - r0);
    const int64_t c0 = order[t].second * chunk, c1 = std::min(p.m, c0 + chunk);
    at::Tensor& buffer = buffers[slot];
    if (!buffer.defined()) buffer = at::empty({chunk * block_rows}, p.q.options());
    const KeyChunk part(p.keys, beta, mask, c0, c1);
    const Problem<T> pc(p.q, part.keys, p.alpha_tensor, part.beta, part.mask, false, block_rows);
    at::Tensor tile = buffer.narrow(0, 0, (c1 - c0) * rows).view({c1 - c0, rows});
    at::mm_out(tile, part.keys, p.q.narrow(0, r0, rows).t());
    if (pc.row_ids) pc.mask_equal_ids(r0, rows, tile);
    fn(r0, rows, c0, pc, tile, slot);
  });
}

// The shared-shift forward (lse_tiles.h): one pass and one exp per entry, e = exp(s - c), summed
// into the query's and (with_col) the key's sum; lse = c + log(sum). Returns false, and the
// caller runs forward_impl, where c is not usable or some sum is too small for it.
template <typename T>
bool shared_shift_forward(const Problem<T>& p, const at::Tensor& beta, const Mask& mask,
                          bool with_col, int64_t requested, T* row_out, T* col_out) {
  const SharedShift<T> shift = shared_shift<T>(p.q, p.keys, p.alpha_tensor, beta);
  if (!shift.usable) return false;
  std::vector<Acc> row_sum(p.n, Acc(0)), col_sum(with_col ? p.m : 0, Acc(0));
  const int64_t block_rows = task_block_rows(p, requested);
  for_each_grid_tile(p, beta, mask, block_rows, chunk_keys(block_rows, sizeof(T), requested),
                     [&](int64_t r0, int64_t rows, int64_t c0, const Problem<T>& pc,
                         at::Tensor& tile, int64_t) {
    const T* a = p.alpha + r0;
    const T* base = tile.data_ptr<T>();
    FlushedSums<T> acc(row_sum.data() + r0, rows);
    for (int64_t j = 0; j < pc.m; ++j) {
      const T* x = base + j * rows;
      const int64_t cut = pc.cut(j, r0, rows);
      const T col = shared_shift_sums_into(acc.data(), x, a, pc.beta[j], shift.exp_shift, 0, cut) +
                    shared_shift_sums_into(acc.data(), x, a, pc.beta[j], shift.exp_shift, cut + 1,
                                           rows);
      acc.row_done();
      if (with_col) col_sum[c0 + j] += col;
    }
    acc.flush();
  });
  if (!shared_sums_usable<T>(row_sum.data(), p.n) ||
      !shared_sums_usable<T>(col_sum.data(), static_cast<int64_t>(col_sum.size())))
    return false;
  for (int64_t i = 0; i < p.n; ++i) row_out[i] = shared_lse<T>(shift.c, row_sum[i]);
  for (int64_t j = 0; with_col && j < p.m; ++j) col_out[j] = shared_lse<T>(shift.c, col_sum[j]);
  return true;
}

template <typename T>
std::tuple<at::Tensor, std::optional<at::Tensor>> forward_impl(const Problem<T>& p, bool with_col) {
  at::Tensor row_lse = new_output({p.n}, p.q.options());
  T* out = row_lse.data_ptr<T>();
  ColumnStats<T> cols(with_col ? p.m : 0);  // merged block after block
  Partials<T> partial(p.block_rows);
  Partials<Acc> partial_sums(p.block_rows);
  std::vector<T> shift(p.block_rows);
  std::vector<Acc> sum(p.block_rows);

  p.for_each_block([&](int64_t r0, int64_t rows, at::Tensor& tile) {
    const T* a = p.alpha + r0;
    if (with_col) {
      // One pass: per-query maxima, and each key's column statistics while its row is in L1.
      partial.reset(rows, -kInf<T>);
      p.for_each_tile_row(r0, rows, tile, [&](int64_t j, const T* x, int64_t cut) {
        cols.merge(j, partial.slot(), x, a, p.beta[j], cut, rows);
      });
      partial.combine_max(shift.data());
      for (int64_t i = 0; i < rows; ++i) shift[i] = safe_shift(shift[i]);
    } else {
      block_shift(p, r0, rows, tile, partial, shift.data());
    }
    block_sums(p, r0, rows, tile, partial_sums, shift.data(), sum.data());
    for (int64_t i = 0; i < rows; ++i) out[r0 + i] = query_lse(p, r0, rows, tile, shift[i], sum[i], i);
  });

  std::optional<at::Tensor> col_lse;
  if (with_col) {
    col_lse = new_output({p.m}, p.q.options());
    T* c = col_lse->data_ptr<T>();
    for (int64_t j = 0; j < p.m; ++j) c[j] = cols.lse(j);
  }
  return {row_lse, col_lse};
}

// The backward on the grid of tiles (for_each_grid_tile): per tile of R queries by C keys, its
// weights W, dq[block] += W^T @ keys[chunk] and dkeys[chunk] += W @ (alpha q)[block]; dq is
// scaled by alpha once every tile is in.
template <typename T>
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> backward_impl(
    const Problem<T>& p, const at::Tensor& beta, const Mask& mask, const at::Tensor& row_lse,
    const at::Tensor& row_grad, const std::optional<at::Tensor>& col_lse,
    const std::optional<at::Tensor>& col_grad, bool need_dq, bool need_dkeys, int64_t requested) {
  std::optional<at::Tensor> dq, dkeys;
  if (need_dq) dq = at::zeros({p.n, p.d}, p.q.options());  // accumulated
  if (need_dkeys) dkeys = at::zeros({p.m, p.d}, p.q.options());
  if ((!need_dq && !need_dkeys) || p.m == 0) return {dq, dkeys};

  std::vector<T> rl(p.n);
  const T* rl_in = row_lse.data_ptr<T>();
  for (int64_t i = 0; i < p.n; ++i) rl[i] = finite_or_inf(rl_in[i]);
  const T* rg = row_grad.data_ptr<T>();
  const T* cl = col_lse ? col_lse->data_ptr<T>() : nullptr;
  const T* cg = col_grad ? col_grad->data_ptr<T>() : nullptr;
  // exp(-inf - NaN) and non-finite g * exp(-inf) are NaN: a NaN lse or a non-finite upstream
  // gradient would leak into the id-masked entries, which are zeroed again then (rare).
  const auto poisons = [](T lse, T grad) { return std::isnan(lse) || !std::isfinite(grad); };
  bool cols_poisoned = false;
  for (int64_t j = 0; cl && j < p.m; ++j) cols_poisoned = cols_poisoned || poisons(cl[j], cg[j]);
  // With the column term, one exp per entry where the weights can share the forward's shift:
  // W_ji = beta_j exp(s - c) (w_i + v_j), w and v the row and column weights (lse_tiles.h).
  std::vector<T> row_w, col_w;
  SharedShift<T> shift{};
  const bool shared = cl && shared_shift_enabled() && [&] {
    shift = shared_shift<T>(p.q, p.keys, p.alpha_tensor, beta);
    return shift.usable && shared_shift_weights(shift.c, rl_in, rg, p.n, row_w) &&
           shared_shift_weights(shift.c, cl, cg, p.m, col_w);
  }();

  const int64_t block_rows = task_block_rows(p, requested);
  std::vector<at::Tensor> scaled_q(static_cast<size_t>(at::get_num_threads()));
  for_each_grid_tile(p, beta, mask, block_rows, chunk_keys(block_rows, sizeof(T), requested),
                     [&](int64_t r0, int64_t rows, int64_t c0, const Problem<T>& pc,
                         at::Tensor& tile, int64_t slot) {
    const T* a = p.alpha + r0;
    const T* g = rg + r0;
    const T* lse = rl.data() + r0;
    // W_ji = beta_j dS_ij, s recomputed from the raw tile; 0 for the masked query.
    T* base = tile.data_ptr<T>();
    for (int64_t j = 0; j < pc.m; ++j) {
      T* x = base + j * rows;
      const T b = pc.beta[j];
      if (shared) {
        const T* w = row_w.data() + r0;
        const T v = col_w[c0 + j];
#pragma omp simd
        for (int64_t i = 0; i < rows; ++i)
          x[i] = b * fast_exp_shifted(x[i] * a[i] * b, shift.exp_shift) * (w[i] + v);
      } else if (cl) {
        const T cg_j = cg[c0 + j], cl_j = finite_or_inf(cl[c0 + j]);
#pragma omp simd
        for (int64_t i = 0; i < rows; ++i) {
          const T s = x[i] * a[i] * b;
          x[i] = b * (g[i] * fast_exp(s - lse[i]) + cg_j * fast_exp(s - cl_j));
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < rows; ++i) x[i] = b * g[i] * fast_exp(x[i] * a[i] * b - lse[i]);
      }
      const int64_t cut = pc.cut(j, r0, rows);
      if (cut < rows) x[cut] = T(0) * b;  // W = beta_j dS: NaN where beta_j is
    }
    bool poisoned = cols_poisoned;
    for (int64_t i = 0; i < rows; ++i) poisoned = poisoned || poisons(rl_in[r0 + i], g[i]);
    if (poisoned && pc.row_ids) pc.mask_equal_ids(r0, rows, tile, T(0));
    if (dq) dq->narrow(0, r0, rows).addmm_(tile.t(), pc.keys);
    if (dkeys) {
      at::Tensor& q_scaled = scaled_q[slot];
      if (!q_scaled.defined()) q_scaled = at::empty({block_rows, p.d}, p.q.options());
      at::Tensor q_block = q_scaled.narrow(0, 0, rows);
      at::mul_out(q_block, p.q.narrow(0, r0, rows),
                  p.alpha_tensor.narrow(0, r0, rows).unsqueeze(1));
      dkeys->narrow(0, c0, pc.m).addmm_(tile, q_block);
    }
  });
  if (dq) dq->mul_(p.alpha_tensor.unsqueeze(1));
  return {dq, dkeys};
}

// Slots (tiles in memory at once) of forward_with_grad_impl for nb blocks, and their bytes.
int64_t tile_slots(int64_t nb) { return std::min<int64_t>(nb, at::get_num_threads() + 1); }

int64_t in_flight_tile_bytes(int64_t n, int64_t m, int64_t elem_size, int64_t rows) {
  return tile_slots((n + rows - 1) / rows) * m * rows * elem_size;
}

// Rows per block of forward_with_grad_impl, whose M x R tiles stay in memory until their block's
// last dkeys update: up to threads + 1 of them at once (its slots). R (from task_rows) is halved,
// down to kMinBlockRows, until those tiles together fit in 1.5 tile budgets (tile_budget,
// lse_tiles.h): the budget of one tile alone let 3 tiles of 16 MiB (2 threads, N = M = 16384,
// D = 256 fp32) take 2.6% of plain PyTorch's memory; R = 128 there, 3 x 8 MiB, with
// single-threaded GEMMs about as fast per FLOP as at R = 256 (2 cores, EPYC). A forced size
// (tests) as given.
int64_t in_flight_rows(int64_t n, int64_t m, int64_t d, int64_t elem_size, int64_t r,
                       int64_t requested, bool need_grad) {
  if (requested > 0 || !need_grad) return r;
  const int64_t budget = 3 * tile_budget(n, m, d, elem_size, /*large_tile=*/false) / 2;
  while (r > kMinBlockRows && in_flight_tile_bytes(n, m, elem_size, r) > budget)
    r = std::max<int64_t>(kMinBlockRows, r / 2 / 16 * 16);
  return r;
}

// One task per query block (its whole row: the max pass needs every key before the exps): the
// M x R tile, its weights W, lse, c and dq[block] = c * (W^T @ keys); then one task per (block,
// key chunk): dkeys[chunk] += W[chunk] @ (c q)[block], after the same chunk's update of the
// previous block (the sums in block order). A block's tile lives in one of threads + 1 slots
// until its last update: a block task waits for the block that used its slot before and for that
// block's updates. Memory: that many M x R tiles (bounded by in_flight_block_rows).
template <typename T>
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>> forward_with_grad_impl(
    const Problem<T>& p, const at::Tensor& row_grad, const std::optional<at::Tensor>& extra_lse,
    bool need_dq, bool need_dkeys, int64_t requested) {
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
  const int64_t block_rows = in_flight_rows(p.n, p.m, p.d, sizeof(T),
                                            task_block_rows(p, requested), requested, need_grad);
  const int64_t nb = (p.n + block_rows - 1) / block_rows;
  const int64_t chunk = chunk_keys(block_rows, sizeof(T), requested);
  const int64_t nc = need_dkeys ? (p.m + chunk - 1) / chunk : 0;
  const int64_t slots = tile_slots(nb);

  // Tasks: block b at index first[b], its chunk updates right after it; edges as above.
  TaskGraph graph(nb * (1 + nc));
  std::vector<int64_t> last(nc, -1);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t t = b * (1 + nc);
    if (b >= slots) {
      const int64_t before = (b - slots) * (1 + nc);
      for (int64_t k = 0; k <= nc; ++k) graph.add_edge(before + k, t);
    }
    for (int64_t k = 0; k < nc; ++k) {
      graph.add_edge(t, t + 1 + k);
      graph.chain(t + 1 + k, last, {k});
    }
  }
  std::vector<at::Tensor> tiles(static_cast<size_t>(slots)), scaled(static_cast<size_t>(slots));

  graph.run([&](int64_t task, int64_t) {
    const int64_t b = task / (1 + nc), k = task % (1 + nc) - 1, slot = b % slots;
    const int64_t r0 = b * block_rows, rows = std::min(block_rows, p.n - r0);
    if (k >= 0) {  // dkeys[chunk k] += W[chunk k] @ (c q)[block b]
      const int64_t c0 = k * chunk, c1 = std::min(p.m, c0 + chunk);
      const at::Tensor w = tiles[slot].narrow(0, c0 * rows, (c1 - c0) * rows).view({c1 - c0, rows});
      dkeys->narrow(0, c0, c1 - c0).addmm_(w, scaled[slot].narrow(0, 0, rows));
      return;
    }
    if (!tiles[slot].defined()) tiles[slot] = at::empty({p.m * block_rows}, p.q.options());
    at::Tensor tile = tiles[slot].narrow(0, 0, p.m * rows).view({p.m, rows});
    at::mm_out(tile, p.keys, p.q.narrow(0, r0, rows).t());
    if (p.row_ids) p.mask_equal_ids(r0, rows, tile);
    const T* a = p.alpha + r0;
    T* base = tile.data_ptr<T>();
    std::vector<T> shift(rows, -kInf<T>);
    std::vector<Acc> sum(rows, Acc(0));
    for (int64_t j = 0; j < p.m; ++j) {
      const int64_t cut = p.cut(j, r0, rows);
      max_into(shift.data(), base + j * rows, a, p.beta[j], 0, cut);
      max_into(shift.data(), base + j * rows, a, p.beta[j], cut + 1, rows);
    }
    for (int64_t i = 0; i < rows; ++i) shift[i] = safe_shift(shift[i]);
    // Queries with a +inf entry: whether they also have a NaN one, before W overwrites the tile.
    std::vector<char> inf_nan(rows);
    for (int64_t i = 0; i < rows; ++i)
      inf_nan[i] = shift[i] == kInf<T> && p.query_has_nan(r0, rows, tile, i);
    // W_ji = beta_j exp(s_ij - shift_i) over the tile, and the per-query sums of the exps.
    FlushedSums<T> acc(sum.data(), rows);
    for (int64_t j = 0; j < p.m; ++j) {
      T* x = base + j * rows;
      const int64_t cut = p.cut(j, r0, rows);
      if (need_grad) {
        exp_weights_into(acc.data(), x, a, p.beta[j], shift.data(), 0, cut);
        exp_weights_into(acc.data(), x, a, p.beta[j], shift.data(), cut + 1, rows);
        if (cut < rows) x[cut] = T(0) * p.beta[j];  // NaN where beta_j is
      } else {
        sum_exp_into(acc.data(), x, a, p.beta[j], shift.data(), 0, cut);
        sum_exp_into(acc.data(), x, a, p.beta[j], shift.data(), cut + 1, rows);
      }
      acc.row_done();
    }
    acc.flush();
    std::vector<int64_t> nan_rows;
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
    for (const int64_t i : nan_rows)
      for (int64_t j = 0; j < p.m; ++j)
        base[j * rows + i] = p.masked(r0 + i, j) ? T(0) * p.beta[j] : kNaN<T>;
    const at::Tensor scale = row_scale.narrow(0, r0, rows).unsqueeze(1);
    if (dq) {
      at::Tensor dq_block = dq->narrow(0, r0, rows);
      at::mm_out(dq_block, tile.t(), p.keys);
      dq_block.mul_(scale);
    }
    if (dkeys) {
      if (!scaled[slot].defined()) scaled[slot] = at::empty({block_rows, p.d}, p.q.options());
      at::Tensor q_block = scaled[slot].narrow(0, 0, rows);
      at::mul_out(q_block, p.q.narrow(0, r0, rows), scale);
    }
  });
  return {row_lse, dq, dkeys};
}

}  // namespace

FusedPlan masked_lse_fused_plan(int64_t n, int64_t m, int64_t d, int64_t elem_size) {
  const int64_t base = choose_block_rows(n, m, d, elem_size, /*large_tile=*/false, 0);
  const int64_t rows = in_flight_rows(n, m, d, elem_size, task_rows(n, base, 0), 0, true);
  return {rows, tile_slots((n + rows - 1) / rows), in_flight_tile_bytes(n, m, elem_size, rows),
          tile_budget(n, m, d, elem_size, /*large_tile=*/false)};
}

std::tuple<at::Tensor, std::optional<at::Tensor>> masked_lse_forward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const Mask& mask, bool with_col_lse, int64_t block_rows) {
  const Operands ops = fold_scales(q, keys, alpha, beta, mask);
  return AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_lse_forward", [&] {
    const Problem<scalar_t> p(ops.q, ops.keys, ops.alpha, ops.beta, mask, /*large_tile=*/true,
                              block_rows);
    if (shared_shift_enabled() && p.n > 0) {
      at::Tensor row_lse = new_output({p.n}, p.q.options());
      std::optional<at::Tensor> col_lse;
      if (with_col_lse) col_lse = new_output({p.m}, p.q.options());
      if (shared_shift_forward(p, ops.beta, mask, with_col_lse, block_rows,
                               row_lse.data_ptr<scalar_t>(),
                               col_lse ? col_lse->data_ptr<scalar_t>() : nullptr))
        return std::make_tuple(row_lse, col_lse);
    }
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
    const bool large_tile = col_lse.has_value() || (!need_dq && !need_dkeys);
    const Problem<scalar_t> p(ops.q, ops.keys, ops.alpha, ops.beta, mask, large_tile, block_rows);
    return backward_impl(p, ops.beta, mask, row_lse, row_grad, col_lse, col_grad, need_dq,
                         need_dkeys, block_rows);
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
    return forward_with_grad_impl(p, row_grad, extra_lse, need_dq, need_dkeys, block_rows);
  });
  unfold(ops, std::get<1>(out), alpha);
  unfold(ops, std::get<2>(out), beta);
  return out;
}

}  // namespace fastcontrast
