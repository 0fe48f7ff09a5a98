// Masked log-sum-exp kernels on CPU, the forward and the recomputing backward (see infonce.h for
// the maths and the contract; the one-pass forward with gradient is in infonce_fused.cpp).
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
// Scheduling (tasks.h, grid_tiles.h): the tiles (block, chunk) of the shared-shift forward and of
// the backward are tasks of one parallel region, each run by one thread with single-threaded
// GEMMs, the tiles of a block (of a chunk) in a fixed order; the gradient rows are zeroed and
// scaled inside the tiles' tasks. So no barrier separates the passes and a thread that the OS
// deschedules holds up only the tasks that wait for its tile.
//
// Why keys x queries: with MKL on 2 cores (N = M = 16384, D = 256, fp32) keys @ q_blk^T ran
// 10-15% faster than q_blk @ keys^T, and the two gradient products equally fast in either layout;
// column statistics (the symmetric loss) become contiguous reductions over a tile row.
// The masked entry of a tile row (query j - diag_offset) is skipped by splitting the query range
// in two, so that no loop tests a mask per element; entries masked by equal ids are set to -inf in
// the tile right after its GEMM (Problem::mask_equal_ids). The exps are in the input dtype, their
// sums in double (lse_math.h).
#include "cpu/infonce.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/fast_exp.h"
#include "cpu/grid_tiles.h"
#include "cpu/lse_tiles.h"
#include "cpu/outputs.h"
#include "cpu/shared_shift.h"
#include "cpu/sided_filter.h"
#include "cpu/weight_rows.h"

namespace fastcontrast {
namespace {

using namespace tiles;  // NOLINT: the shared pieces (lse_tiles.h, grid_tiles.h)

// The shared-shift forward (shared_shift.h): one pass and one exp per entry, e = exp(s - c), summed
// into the query's and (with_col) the key's sum; lse = c + log(sum). Returns false, and the
// caller runs forward_impl, where c is not usable or some sum is too small for it.
// A symmetric filter's one-direction drops are applied here by their masks (sided_filter.h).
template <typename T>
bool shared_shift_forward(const Problem<T>& p, const at::Tensor& beta, const Mask& mask_in,
                          bool with_col, int64_t requested, T* row_out, T* col_out) {
  const SharedShift<T> shift = shared_shift<T>(p.q, p.keys, p.alpha_tensor, beta);
  if (!shift.usable) return false;
  Mask mask = mask_in;
  const bool sided = mask.filter && mask.filter->symmetric();
  if (sided) {
    mask.filter->sided = nullptr;
    mask.filter->sided_masks = true;
  }
  std::vector<Acc> row_sum(p.n, Acc(0)), col_sum(with_col ? p.m : 0, Acc(0));
  const int64_t block_rows = task_block_rows(p, requested);
  for_each_grid_tile(p, beta, mask, block_rows, chunk_keys(block_rows, sizeof(T), requested),
                     [&](const GridTile& g, const Problem<T>& pc, at::Tensor& tile, int64_t) {
    const int64_t r0 = g.r0, rows = g.rows, c0 = g.c0;
    const T* a = p.alpha + r0;
    const T* base = tile.data_ptr<T>();
    FlushedSums<T> acc(row_sum.data() + r0, rows);
    const auto sums = [&](auto kind, const T* x, T b, int64_t cut, const uint8_t* code) {
      constexpr bool kSided = decltype(kind)::value;
      return shared_shift_sums_into<kSided>(acc.data(), x, a, b, shift.exp_shift, 0, cut, code) +
             shared_shift_sums_into<kSided>(acc.data(), x, a, b, shift.exp_shift, cut + 1, rows,
                                            code);
    };
    for (int64_t j = 0; j < pc.m; ++j) {
      const T* x = base + j * rows;
      const int64_t cut = pc.cut(j, r0, rows);
      const uint8_t* code = sided ? sided_mask().row(j) : nullptr;
      const T col = code ? sums(std::true_type{}, x, pc.beta[j], cut, code)
                         : sums(std::false_type{}, x, pc.beta[j], cut, code);
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
  BlockLseScratch<T> scratch(p.block_rows);
  p.for_each_block([&](int64_t r0, int64_t rows, at::Tensor& tile) {
    block_lse(p, r0, rows, tile, with_col ? &cols : nullptr, scratch, out + r0);
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
// weights W, dq[block] += W^T @ keys[chunk] and dkeys[chunk] += W @ (alpha q)[block]; the first
// tile of a block (chunk) zeroes its rows of dq (dkeys), the last tile of a block scales its dq
// rows by alpha.
template <typename T>
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> backward_impl(
    const Problem<T>& p, const at::Tensor& beta, const Mask& mask, const at::Tensor& row_lse,
    const at::Tensor& row_grad, const std::optional<at::Tensor>& col_lse,
    const std::optional<at::Tensor>& col_grad, bool need_dq, bool need_dkeys, int64_t requested) {
  std::optional<at::Tensor> dq, dkeys;
  const bool no_tiles = p.n == 0 || p.m == 0;  // then the gradients are 0 (or empty)
  const auto gradient = [&](int64_t rows) {  // accumulated, from the zeros of the first tile
    return no_tiles ? at::zeros({rows, p.d}, p.q.options())
                    : new_output({rows, p.d}, p.q.options());
  };
  if (need_dq) dq = gradient(p.n);
  if (need_dkeys) dkeys = gradient(p.m);
  if ((!need_dq && !need_dkeys) || no_tiles) return {dq, dkeys};

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
  // W_ji = beta_j exp(s - c) (w_i + v_j), w and v the row and column weights (shared_shift.h).
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
                     [&](const GridTile& gt, const Problem<T>& pc, at::Tensor& tile,
                         int64_t slot) {
    const int64_t r0 = gt.r0, rows = gt.rows, c0 = gt.c0;
    const T* a = p.alpha + r0;
    const T* g = rg + r0;
    const T* lse = rl.data() + r0;
    // W_ji = beta_j dS_ij, s recomputed from the raw tile; 0 for the masked query. A symmetric
    // filter's one-direction drops by their masks (sided_filter.h, weight_rows.h).
    T* base = tile.data_ptr<T>();
    const bool sided = pc.filter && pc.filter->sided_masks;
    for (int64_t j = 0; j < pc.m; ++j) {
      T* x = base + j * rows;
      const T b = pc.beta[j];
      const uint8_t* code = sided ? sided_mask().row(j) : nullptr;
      const auto weights = [&](auto kind) {
        constexpr bool kSided = decltype(kind)::value;
        if (shared)
          shared_weights_row<kSided>(x, a, b, shift.exp_shift, row_w.data() + r0, col_w[c0 + j],
                                     code, rows);
        else if (cl)
          two_exp_weights_row<kSided>(x, a, b, g, lse, cg[c0 + j], finite_or_inf(cl[c0 + j]),
                                      code, rows);
        else
          row_weights_row<kSided>(x, a, b, g, lse, code, rows);
      };
      if (code)
        weights(std::true_type{});
      else
        weights(std::false_type{});
      const int64_t cut = pc.cut(j, r0, rows);
      if (cut < rows) x[cut] = T(0) * b;  // W = beta_j dS: NaN where beta_j is
    }
    bool poisoned = cols_poisoned;
    for (int64_t i = 0; i < rows; ++i) poisoned = poisoned || poisons(rl_in[r0 + i], g[i]);
    if (poisoned && pc.row_ids) pc.mask_equal_ids(r0, rows, tile, T(0));
    if (dq) {
      at::Tensor dq_block = dq->narrow(0, r0, rows);
      if (gt.block_first) dq_block.zero_();
      dq_block.addmm_(tile.t(), pc.keys);
      if (gt.block_last) dq_block.mul_(p.alpha_tensor.narrow(0, r0, rows).unsqueeze(1));
    }
    if (dkeys) {
      at::Tensor& q_scaled = scaled_q[slot];
      if (!q_scaled.defined()) q_scaled = at::empty({block_rows, p.d}, p.q.options());
      at::Tensor q_block = q_scaled.narrow(0, 0, rows);
      at::mul_out(q_block, p.q.narrow(0, r0, rows),
                  p.alpha_tensor.narrow(0, r0, rows).unsqueeze(1));
      at::Tensor dkeys_chunk = dkeys->narrow(0, c0, pc.m);
      if (gt.chunk_first) dkeys_chunk.zero_();
      dkeys_chunk.addmm_(tile, q_block);
    }
  });
  return {dq, dkeys};
}

}  // namespace

std::tuple<at::Tensor, std::optional<at::Tensor>> masked_lse_forward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const Mask& mask_in, bool with_col_lse, int64_t block_rows) {
  // A symmetric filter: the exact passes get the entries that one direction keeps back
  // (sided_filter.h; the shared-shift forward applies them by masks and gives back none).
  const bool sided = mask_in.filter && mask_in.filter->symmetric();
  SidedLse given_back(sided ? q.size(0) : 0, sided ? keys.size(0) : 0);
  Mask mask = mask_in;
  if (sided) mask.filter->sided = &given_back;
  const Operands ops = fold_scales(q, keys, alpha, beta, mask);
  auto out = AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_lse_forward", [&] {
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
      given_back.reset();  // the exact pass below filters the tiles again
    }
    return forward_impl(p, with_col_lse);
  });
  if (sided) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_lse_forward_sided", [&] {
      SidedLse::fold(std::get<0>(out).data_ptr<scalar_t>(), given_back.row_max,
                     given_back.row_sum, q.size(0));
      if (std::get<1>(out))
        SidedLse::fold(std::get<1>(out)->data_ptr<scalar_t>(), given_back.col_max,
                       given_back.col_sum, keys.size(0));
    });
  }
  return out;
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> masked_lse_backward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const at::Tensor& row_lse, const at::Tensor& row_grad, const std::optional<at::Tensor>& col_lse,
    const std::optional<at::Tensor>& col_grad, const Mask& mask_in, bool need_dq, bool need_dkeys,
    int64_t block_rows) {
  Mask mask = mask_in;  // a symmetric filter's one-direction drops by their masks
  if (mask.filter && mask.filter->symmetric()) mask.filter->sided_masks = true;
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

}  // namespace fastcontrast
