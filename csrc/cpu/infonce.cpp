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
#include "cpu/lse_tiles.h"
#include "cpu/outputs.h"

namespace fastcontrast {
namespace {

using namespace tiles;  // NOLINT: the shared pieces (lse_tiles.h)

// The shared-shift forward (lse_tiles.h): one pass and one exp per entry, e = exp(s - c), summed
// into the query's and (with_col) the key's sum; lse = c + log(sum). Returns false, and the
// caller runs forward_impl, where c is not finite or some sum is too small for it.
template <typename T>
bool shared_shift_forward(const Problem<T>& p, const at::Tensor& beta, bool with_col, T* row_out,
                          T* col_out) {
  const T shift = shared_shift<T>(p.q, p.keys, p.alpha_tensor, beta);
  if (!std::isfinite(shift)) return false;
  Partials<T> partial(p.block_rows);
  std::vector<T> col_sum(with_col ? p.m : 0, T(0));
  p.for_each_block([&](int64_t r0, int64_t rows, at::Tensor& tile) {
    const T* a = p.alpha + r0;
    partial.reset(rows, T(0));
    p.for_each_tile_row(r0, rows, tile, [&](int64_t j, const T* x, int64_t cut) {
      T* acc = partial.slot();
      const T col = shared_shift_sums_into(acc, x, a, p.beta[j], shift, 0, cut) +
                    shared_shift_sums_into(acc, x, a, p.beta[j], shift, cut + 1, rows);
      if (with_col) col_sum[j] += col;  // one thread per key
    });
    partial.combine_sum(row_out + r0);
  });
  if (!shared_sums_usable(row_out, p.n) || !shared_sums_usable(col_sum.data(), col_sum.size()))
    return false;
  for (int64_t i = 0; i < p.n; ++i) row_out[i] = shift + std::log(row_out[i]);
  for (int64_t j = 0; with_col && j < p.m; ++j) col_out[j] = shift + std::log(col_sum[j]);
  return true;
}

template <typename T>
std::tuple<at::Tensor, std::optional<at::Tensor>> forward_impl(const Problem<T>& p, bool with_col) {
  at::Tensor row_lse = new_output({p.n}, p.q.options());
  T* out = row_lse.data_ptr<T>();
  ColumnStats<T> cols(with_col ? p.m : 0);  // merged block after block
  Partials<T> partial(p.block_rows);
  std::vector<T> shift(p.block_rows), sum(p.block_rows);

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
    block_sums(p, r0, rows, tile, partial, shift.data(), sum.data());
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

// The backward in key chunks (chunk_keys, lse_tiles.h): per query block, per chunk of C keys, the
// C x R tile, its weights W, dq[block] += W^T @ keys[chunk] and dkeys[chunk] += W @ (alpha q)[block];
// dq[block] is scaled by alpha once all chunks are in.
template <typename T>
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> backward_impl(
    const Problem<T>& p, const at::Tensor& beta, const Mask& mask, const at::Tensor& row_lse,
    const at::Tensor& row_grad, const std::optional<at::Tensor>& col_lse,
    const std::optional<at::Tensor>& col_grad, bool need_dq, bool need_dkeys, int64_t requested,
    bool large_tile) {
  std::optional<at::Tensor> dq, dkeys;
  if (need_dq) dq = new_output({p.n, p.d}, p.q.options());
  if (need_dkeys) dkeys = at::zeros({p.m, p.d}, p.q.options());  // accumulated
  if (!need_dq && !need_dkeys) return {dq, dkeys};
  if (p.m == 0) {
    if (dq) dq->zero_();
    return {dq, dkeys};
  }

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
  // With the column term, one exp per entry where the weights can share the forward's shift:
  // W_ji = beta_j exp(s - c) (w_i + v_j), w and v the row and column weights (lse_tiles.h).
  std::vector<T> row_w, col_w;
  T shift = 0;
  const bool shared = cl && shared_shift_enabled() && [&] {
    shift = shared_shift<T>(p.q, p.keys, p.alpha_tensor, beta);
    return std::isfinite(shift) && shared_shift_weights(shift, rl_in, rg, p.n, row_w) &&
           shared_shift_weights(shift, cl, cg, p.m, col_w);
  }();

  const int64_t chunk = chunk_keys(p.block_rows, sizeof(T), requested);
  at::Tensor buffer = at::empty({chunk * p.block_rows}, p.q.options());
  for (int64_t r0 = 0; r0 < p.n; r0 += p.block_rows) {
    const int64_t rows = std::min(p.block_rows, p.n - r0);
    const T* a = p.alpha + r0;
    const T* g = rg + r0;
    bool poisoned = cols_poisoned;
    for (int64_t i = 0; i < rows; ++i) poisoned = poisoned || poisons(rl_in[r0 + i], g[i]);
    const T* lse = rl.data() + r0;
    const at::Tensor q_block = p.q.narrow(0, r0, rows);
    const at::Tensor c = p.alpha_tensor.narrow(0, r0, rows).unsqueeze(1);
    at::Tensor q_scaled;
    if (dkeys) {
      q_scaled = scaled_q.narrow(0, 0, rows);
      at::mul_out(q_scaled, q_block, c);
    }
    for (int64_t c0 = 0; c0 < p.m; c0 += chunk) {
      const int64_t c1 = std::min(p.m, c0 + chunk);
      const KeyChunk part(p.keys, beta, mask, c0, c1);
      const Problem<T> pc(p.q, part.keys, p.alpha_tensor, part.beta, part.mask, large_tile,
                          p.block_rows);
      at::Tensor tile = buffer.narrow(0, 0, (c1 - c0) * rows).view({c1 - c0, rows});
      at::mm_out(tile, part.keys, q_block.t());
      if (pc.row_ids) pc.mask_equal_ids(r0, rows, tile);
      // W_ji = beta_j dS_ij, s recomputed from the raw tile; 0 for the masked query.
      pc.for_each_tile_row(r0, rows, tile, [&](int64_t j, T* x, int64_t cut) {
        const T b = pc.beta[j];
        if (shared) {
          const T* w = row_w.data() + r0;
          const T v = col_w[c0 + j];
#pragma omp simd
          for (int64_t i = 0; i < rows; ++i)
            x[i] = b * fast_exp(x[i] * a[i] * b - shift) * (w[i] + v);
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
        if (cut < rows) x[cut] = T(0) * b;  // W = beta_j dS: NaN where beta_j is
      });
      if (poisoned && pc.row_ids) pc.mask_equal_ids(r0, rows, tile, T(0));
      if (dq) {
        at::Tensor dq_block = dq->narrow(0, r0, rows);
        if (c0 == 0) {
          at::mm_out(dq_block, tile.t(), part.keys);
        } else {
          dq_block.addmm_(tile.t(), part.keys);
        }
      }
      if (dkeys) dkeys->narrow(0, c0, c1 - c0).addmm_(tile, q_scaled);
    }
    if (dq) dq->narrow(0, r0, rows).mul_(c);
  }
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


}  // namespace

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
      if (shared_shift_forward(p, ops.beta, with_col_lse, row_lse.data_ptr<scalar_t>(),
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
                         need_dkeys, block_rows, large_tile);
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
