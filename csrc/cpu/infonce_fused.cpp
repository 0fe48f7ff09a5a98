// The one-pass forward with gradient of the full-product masked log-sum-exp on CPU
// (masked_lse_forward_with_grad, see infonce.h for the contract and infonce.cpp for the layout):
// no recompute, one task per query block for its whole row of keys and one per (block, key chunk)
// for the dkeys update (tasks.h), with a bounded number of M x R tiles in memory at once.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/block_tasks.h"
#include "cpu/fast_exp.h"
#include "cpu/grid_tiles.h"
#include "cpu/infonce.h"
#include "cpu/lse_tiles.h"
#include "cpu/outputs.h"
#include "cpu/tasks.h"

namespace fastcontrast {
namespace {

using namespace tiles;  // NOLINT: the shared pieces (lse_tiles.h, tasks.h)

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
  return rows_in_budget(n, m, elem_size, r, 1, budget);
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
  // Accumulated: block 0's update of each chunk zeroes the chunk's rows first (no tasks, no
  // block 0, when there are no queries).
  if (need_dkeys) dkeys = p.n > 0 ? new_output({p.m, p.d}, p.q.options())
                                  : at::zeros({p.m, p.d}, p.q.options());
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

  // Tasks: block b, its chunk updates right after it (block_tasks.h).
  TaskGraph graph(nb * (1 + nc));
  add_block_edges(graph, nb, nc, slots);
  std::vector<at::Tensor> tiles(static_cast<size_t>(slots)), scaled(static_cast<size_t>(slots));

  graph.run([&](int64_t task, int64_t) {
    const auto [b, k, slot] = block_task(task, nc, slots);
    const int64_t r0 = b * block_rows, rows = std::min(block_rows, p.n - r0);
    if (k >= 0) {  // dkeys[chunk k] += W[chunk k] @ (c q)[block b]
      const int64_t c0 = k * chunk, c1 = std::min(p.m, c0 + chunk);
      const at::Tensor w = tiles[slot].narrow(0, c0 * rows, (c1 - c0) * rows).view({c1 - c0, rows});
      at::Tensor dkeys_chunk = dkeys->narrow(0, c0, c1 - c0);
      if (b == 0) dkeys_chunk.zero_();
      dkeys_chunk.addmm_(w, scaled[slot].narrow(0, 0, rows));
      return;
    }
    if (!tiles[slot].defined()) tiles[slot] = at::empty({p.m * block_rows}, p.q.options());
    at::Tensor tile = tiles[slot].narrow(0, 0, p.m * rows).view({p.m, rows});
    at::mm_out(tile, p.keys, p.q.narrow(0, r0, rows).t());
    p.mask_tile(r0, rows, tile);
    const T* a = p.alpha + r0;
    T* base = tile.data_ptr<T>();
    const std::vector<T> shift = serial_block_shift(p, r0, rows, tile);
    std::vector<Acc> sum(rows, Acc(0));
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
  return {rows, tile_slots((n + rows - 1) / rows), in_flight_tile_bytes(n, m, elem_size, rows, 1),
          tile_budget(n, m, d, elem_size, /*large_tile=*/false)};
}
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>
masked_lse_forward_with_grad(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                             const at::Tensor& beta, const at::Tensor& row_grad, const Mask& mask,
                             const std::optional<at::Tensor>& extra_lse, bool need_dq,
                             bool need_dkeys, int64_t block_rows) {
  const Operands ops = fold_scales(q, keys, alpha, beta, mask);
  auto out = AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_lse_forward_with_grad", [&] {
    const bool large_tile = !need_dq && !need_dkeys;
    const Problem<scalar_t> p(ops.q, ops.keys, ops.alpha, ops.beta, mask, large_tile, block_rows);
    return forward_with_grad_impl(p, row_grad, extra_lse, need_dq, need_dkeys, block_rows);
  });
  unfold(ops, std::get<1>(out), alpha);
  unfold(ops, std::get<2>(out), beta);
  return out;
}

}  // namespace fastcontrast
