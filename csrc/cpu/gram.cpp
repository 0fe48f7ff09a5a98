// Symmetric-Gram masked log-sum-exp kernels on CPU (see gram.h for the maths and the contract).
//
// Rows are processed in strips: strip r0 .. r0 + R holds the scores of its R rows with rows
// r0 .. N (the diagonal block and everything right of it), from one ATen GEMM in the transposed
// layout of infonce.cpp (tile[j][i] = <z_{r0+j}, z_{r0+i}>, (N - r0) x R). A tile row j >= R is
// an entry of both row r0 + i (as a query) and row r0 + j (as a key): the forward merges it into
// the running statistics of both, the backward turns it into the pair weight
//   H_ij = alpha_i beta_j (g_i exp(s_ij - lse_i) + g_j exp(s_ij - lse_j))
// and uses it twice: dz[r0:r0+R] += H^T @ z[r0:]   and   dz[r0+R:] += H[R:] @ z[r0:r0+R].
// The diagonal block (tile rows j < R) is computed in full and used once (H is symmetric there).
// Work: the strips cover N (N + R) / 2 entries, so forward N^2 D and backward 3 N^2 D
// multiply-adds instead of 2 and 4 N^2 D for the full product.
//
// Calls whose id mask meets unusable scales (fold_scales) run on the full-product kernels of
// infonce.cpp, which fold the scales into the operands: a rare, non-finite-input path.
#include "cpu/gram.h"

#include <algorithm>
#include <vector>

#include "cpu/fast_exp.h"
#include "cpu/lse_tiles.h"
#include "cpu/outputs.h"

namespace fastcontrast {
namespace {

using namespace tiles;  // NOLINT: the shared pieces (lse_tiles.h)

// One strip in local indices: queries z[r0:r0+rows], keys z[r0:N]; the diagonal mask becomes
// diag_offset 0 and the ids are those of the strip's rows and keys.
struct Strip {
  at::Tensor q, keys, alpha, beta;
  Mask mask;
  Strip(const at::Tensor& z, const at::Tensor& alpha_, const at::Tensor& beta_, const Mask& m,
        int64_t r0, int64_t rows)
      : q(z.narrow(0, r0, rows)), keys(z.narrow(0, r0, z.size(0) - r0)),
        alpha(alpha_.narrow(0, r0, rows)), beta(beta_.narrow(0, r0, z.size(0) - r0)),
        mask{m.exclude_diag, 0, std::nullopt, std::nullopt} {
    if (m.row_ids) {
      mask.row_ids = m.row_ids->narrow(0, r0, rows);
      mask.col_ids = m.col_ids->narrow(0, r0, z.size(0) - r0);
    }
  }
};

// Calls fn(r0, rows, p, tile) for each strip, p its Problem (one block of `rows` queries) and
// tile ((N - r0), rows) = z[r0:] @ z[r0:r0+rows]^T with the id-masked entries at -inf.
template <typename T, typename Fn>
void for_each_strip(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                    const Mask& mask, int64_t block_rows, Fn&& fn) {
  const int64_t n = z.size(0);
  at::Tensor buffer = at::empty({n * block_rows}, z.options());
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    const Strip strip(z, alpha, beta, mask, r0, rows);
    const Problem<T> p(strip.q, strip.keys, strip.alpha, strip.beta, strip.mask, false, rows);
    at::Tensor tile = buffer.narrow(0, 0, (n - r0) * rows).view({n - r0, rows});
    at::mm_out(tile, strip.keys, strip.q.t());
    if (p.row_ids) p.mask_equal_ids(0, rows, tile);
    fn(r0, rows, p, tile);
  }
}

template <typename T>
int64_t gram_block_rows(const at::Tensor& z, int64_t requested) {
  const int64_t n = z.size(0);
  return choose_block_rows(n, n, z.size(1), sizeof(T), /*large_tile=*/true, requested);
}

template <typename T>
at::Tensor forward_impl(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                        const Mask& mask, int64_t requested) {
  const int64_t n = z.size(0), block_rows = gram_block_rows<T>(z, requested);
  at::Tensor row_lse = new_output({n}, z.options());
  T* out = row_lse.data_ptr<T>();
  ColumnStats<T> cols(n);  // row k's entries with the rows of earlier strips
  Partials<T> partial(block_rows);
  std::vector<T> shift(block_rows), sum(block_rows);

  for_each_strip<T>(z, alpha, beta, mask, block_rows,
                    [&](int64_t r0, int64_t rows, const Problem<T>& p, at::Tensor& tile) {
    const T* a = p.alpha;
    partial.reset(rows, -kInf<T>);
    p.for_each_tile_row(0, rows, tile, [&](int64_t j, const T* x, int64_t cut) {
      T* mx = partial.slot();
      const T b = p.beta[j];
      if (j >= rows) {  // right of the diagonal block: row r0 + j's statistics too
        cols.merge(r0 + j, mx, x, a, b, cut, rows);
      } else {
        max_into(mx, x, a, b, 0, cut);
        max_into(mx, x, a, b, cut + 1, rows);
      }
    });
    partial.combine_max(shift.data());
    for (int64_t i = 0; i < rows; ++i) shift[i] = safe_shift(shift[i]);
    block_sums(p, 0, rows, tile, partial, shift.data(), sum.data());
    for (int64_t i = 0; i < rows; ++i)
      out[r0 + i] = log_add_exp(query_lse(p, 0, rows, tile, shift[i], sum[i], i),
                                cols.lse(r0 + i));
  });
  return row_lse;
}

template <typename T>
at::Tensor backward_impl(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                         const at::Tensor& row_lse, const at::Tensor& row_grad, const Mask& mask,
                         int64_t requested) {
  const int64_t n = z.size(0), block_rows = gram_block_rows<T>(z, requested);
  at::Tensor dz = at::zeros({n, z.size(1)}, z.options());  // accumulated
  const T* lse_in = row_lse.data_ptr<T>();
  const T* g = row_grad.data_ptr<T>();
  std::vector<T> rl(n);
  for (int64_t k = 0; k < n; ++k) rl[k] = finite_or_inf(lse_in[k]);
  // exp(-inf - NaN) and non-finite g * exp(-inf) are NaN: a NaN lse or a non-finite upstream
  // gradient of a row from r0 on leaks into strip r0's id-masked entries, zeroed again then.
  std::vector<char> poisoned_from(n + 1, 0);
  for (int64_t k = n - 1; k >= 0; --k)
    poisoned_from[k] = poisoned_from[k + 1] || std::isnan(lse_in[k]) || !std::isfinite(g[k]);

  for_each_strip<T>(z, alpha, beta, mask, block_rows,
                    [&](int64_t r0, int64_t rows, const Problem<T>& p, at::Tensor& tile) {
    const T* a = p.alpha;
    const T* gi = g + r0;
    const T* li = rl.data() + r0;
    p.for_each_tile_row(0, rows, tile, [&](int64_t j, T* x, int64_t cut) {
      const T b = p.beta[j], gj = g[r0 + j], lj = rl[r0 + j];
#pragma omp simd
      for (int64_t i = 0; i < rows; ++i) {
        const T ab = a[i] * b;
        const T s = x[i] * ab;
        x[i] = ab * (gi[i] * fast_exp(s - li[i]) + gj * fast_exp(s - lj));
      }
      if (cut < rows) x[cut] = T(0) * a[cut] * b;  // H = alpha beta dS: NaN where a scale is
    });
    if (poisoned_from[r0] && p.row_ids) p.mask_equal_ids(0, rows, tile, T(0));
    const int64_t len = n - r0;
    dz.narrow(0, r0, rows).addmm_(tile.t(), p.keys);
    if (len > rows)
      dz.narrow(0, r0 + rows, len - rows).addmm_(tile.narrow(0, rows, len - rows), p.q);
  });
  return dz;
}

}  // namespace

at::Tensor gram_lse_forward(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                            const Mask& mask, int64_t block_rows) {
  if (fold_scales(z, z, alpha, beta, mask).folded)
    return std::get<0>(masked_lse_forward(z, z, alpha, beta, mask, false, block_rows));
  return AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "gram_lse_forward", [&] {
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
