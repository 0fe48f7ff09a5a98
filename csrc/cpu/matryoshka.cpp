// The Matryoshka log-sum-exps on CPU (see matryoshka.h for the maths and the contract).
//
// Queries in blocks of R rows, the keys x queries tile layout of infonce.cpp. Per block, the
// chunks' GEMMs accumulate into the prefix tiles: S^0 = keys[:, chunk 0] @ q_blk[:, chunk 0]^T,
// S^p = S^{p-1} + keys[:, chunk p] @ q_blk[:, chunk p]^T, so the P prefixes cost the FLOPs of one
// product. The forward runs the exact per-row passes of the plain kernels (block_lse,
// lse_tiles.h) on each S^p with that prefix's scales while it accumulates (one tile). The
// backward keeps the block's P prefix tiles and walks them from the longest prefix down: the tile
// of prefix p is overwritten with G_p = alpha_p beta_p dS^p + G_{p+1}, which is the gradient
// weight of chunk p, so each chunk gets one pair of gradient GEMMs whatever P is.
#include "cpu/matryoshka.h"

#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "cpu/fast_exp.h"
#include "cpu/host_threads.h"
#include "cpu/lse_tiles.h"
#include "cpu/outputs.h"
#include "register_ops.h"

namespace fastcontrast {
namespace {

using namespace tiles;  // NOLINT: the shared pieces (lse_tiles.h)

// Per query, an upper bound of its prefix scores (Cauchy-Schwarz): c_i = |alpha_i| |q_i[:d]|
// max_j |beta_j| |keys_j[:d]|, into c; false where a bound is not finite (then unused).
template <typename T>
bool score_bounds(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                  const at::Tensor& beta, int64_t d, std::vector<T>& c) {
  if (keys.size(0) == 0 || q.size(0) == 0) return false;
  const at::Tensor rows = q.narrow(1, 0, d).norm(2, 1).mul(alpha.abs()).contiguous();
  const double key_max = keys.narrow(1, 0, d).norm(2, 1).mul(beta.abs()).max().item<double>();
  const T* r = rows.data_ptr<T>();
  c.assign(r, r + q.size(0));
  for (T& v : c) v = static_cast<T>(v * key_max);
  return std::isfinite(key_max) && std::all_of(c.begin(), c.end(), [](T v) {
    return std::isfinite(v);
  });
}

// The P per-prefix Problems over the same inputs (row p of alpha / beta as the scales), all with
// R = block_rows, and each prefix's score bounds (score_bounds; usable[p] false: none).
template <typename T>
struct Prefixes {
  std::vector<at::Tensor> alphas, betas;
  std::vector<Problem<T>> problem;
  std::vector<std::vector<T>> bound;
  std::vector<char> usable;
  Prefixes(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
           const at::Tensor& beta, const std::vector<int64_t>& dims, bool exclude_diag,
           int64_t block_rows) {
    const int64_t count = alpha.size(0);
    alphas.reserve(count);  // the Problems hold references to these
    betas.reserve(count);
    problem.reserve(count);
    bound.resize(count);
    const Mask mask{exclude_diag, 0, std::nullopt, std::nullopt};
    for (int64_t p = 0; p < count; ++p) {
      alphas.push_back(alpha.select(0, p));
      betas.push_back(beta.select(0, p));
      problem.emplace_back(q, keys, alphas.back(), betas.back(), mask, true, block_rows);
      usable.push_back(score_bounds(q, keys, alphas.back(), betas.back(), dims[p + 1], bound[p]));
    }
  }
};

// The row lse of the block in ONE pass: exps shifted by the query's score bound c_i (never below
// a score, so no overflow), summed in T over kFlushRows keys, then in double (FlushedSums). The
// exact two passes of block_lse cost twice as much per prefix. Returns false, leaving the block
// to block_lse, where some row's sum is so small (its scores far below the bound, e.g. large
// unnormalised features) that the shifted exps would lose precision, or no entry.
template <typename T>
bool bounded_block_lse(const Problem<T>& p, int64_t r0, int64_t rows, at::Tensor& tile,
                       const T* c, Partials<Acc>& partial, T* out) {
  const T* a = p.alpha + r0;
  const T* shift = c + r0;
  T* base = tile.data_ptr<T>();
  partial.reset(rows, Acc(0));
  const int64_t grain = std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(rows, 1));
  at::parallel_for(0, p.m, grain, [&](int64_t begin, int64_t end) {
    FlushedSums<T> acc(partial.slot(), rows);
    for (int64_t j = begin; j < end; ++j) {
      const T* x = base + j * rows;
      const int64_t cut = p.cut(j, r0, rows);
      sum_exp_into(acc.data(), x, a, p.beta[j], shift, 0, cut);
      sum_exp_into(acc.data(), x, a, p.beta[j], shift, cut + 1, rows);
      acc.row_done();
    }
    acc.flush();
  });
  std::vector<Acc> sum(rows);
  partial.combine_sum(sum.data());
  constexpr Acc kSmallest = 1e-25;  // the largest exp above ~1e-29: a normal float
  for (int64_t i = 0; i < rows; ++i)
    if (!(sum[i] >= kSmallest) && !std::isnan(sum[i])) return false;
  for (int64_t i = 0; i < rows; ++i) out[i] = lse_from(shift[i], sum[i]);
  return true;
}

// Prefix p's row lse of the block: one bounded pass where it can, else the exact passes (and
// always those with the column statistics).
template <typename T>
void prefix_block_lse(const Prefixes<T>& prefixes, int64_t p, int64_t r0, int64_t rows,
                      at::Tensor& tile, ColumnStats<T>* cols, BlockLseScratch<T>& scratch,
                      Partials<Acc>& partial, T* out) {
  const Problem<T>& problem = prefixes.problem[p];
  if (cols || !prefixes.usable[p] ||
      !bounded_block_lse(problem, r0, rows, tile, prefixes.bound[p].data(), partial, out))
    block_lse(problem, r0, rows, tile, cols, scratch, out);
}

// tile (M x rows) = keys[:, lo:hi] @ q[r0:r0+rows, lo:hi]^T, or += it (the next chunk).
void chunk_product(at::Tensor& tile, const at::Tensor& q, const at::Tensor& keys, int64_t r0,
                   int64_t rows, int64_t lo, int64_t hi, bool first) {
  const at::Tensor k = keys.narrow(1, lo, hi - lo);
  const at::Tensor x = q.narrow(0, r0, rows).narrow(1, lo, hi - lo).t();
  if (first) {
    at::mm_out(tile, k, x);
  } else {
    tile.addmm_(k, x);
  }
}

template <typename T>
std::tuple<at::Tensor, std::optional<at::Tensor>> forward_impl(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, bool exclude_diag, bool with_col, int64_t requested) {
  const int64_t n = q.size(0), m = keys.size(0), count = alpha.size(0);
  const int64_t block_rows = choose_block_rows(n, m, q.size(1), sizeof(T), true, requested);
  const Prefixes<T> prefixes(q, keys, alpha, beta, bounds, exclude_diag, block_rows);
  at::Tensor row_lse = new_output({count, n}, q.options());
  T* out = row_lse.data_ptr<T>();
  std::vector<ColumnStats<T>> cols(with_col ? count : 0, ColumnStats<T>(m));
  BlockLseScratch<T> scratch(block_rows);
  Partials<Acc> partial(block_rows);
  at::Tensor buffer = at::empty({m * block_rows}, q.options());
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    at::Tensor tile = buffer.narrow(0, 0, m * rows).view({m, rows});
    for (int64_t p = 0; p < count; ++p) {
      chunk_product(tile, q, keys, r0, rows, bounds[p], bounds[p + 1], p == 0);
      prefix_block_lse(prefixes, p, r0, rows, tile, with_col ? &cols[p] : nullptr, scratch,
                       partial, out + p * n + r0);
    }
  }
  std::optional<at::Tensor> col_lse;
  if (with_col) {
    col_lse = new_output({count, m}, q.options());
    T* c = col_lse->data_ptr<T>();
    for (int64_t p = 0; p < count; ++p)
      for (int64_t j = 0; j < m; ++j) c[p * m + j] = cols[p].lse(j);
  }
  return {row_lse, col_lse};
}

// The inputs of one prefix's gradient weights over a block: its scales, row / column lse (with
// -inf turned into +inf: no candidate, no weight) and upstream gradients.
template <typename T>
struct PrefixGrad {
  const T* lse;  // (N,) of this prefix, finite_or_inf
  const T* g;
  const T* col_lse;  // (M,) or nullptr
  const T* col_g;
};

// Over the tile of S^p (raw prefix products), in place: x <- alpha_p beta_p dS^p + next (G_{p+1},
// or nothing for the longest prefix), with dalpha_p / dbeta_p of the block accumulated. Each task
// (a range of keys) keeps its dalpha partial sums in T over kFlushRows keys, then adds them into
// its thread's double slot (FlushedSums): a double accumulator in the loop stops it vectorising.
template <typename T, bool kCol, bool kFold>
void prefix_weights(const Problem<T>& p, int64_t r0, int64_t rows, at::Tensor& tile,
                    const T* next, const PrefixGrad<T>& in, Partials<Acc>& partial, T* dalpha,
                    T* dbeta) {
  const T* a = p.alpha + r0;
  const T* lse = in.lse + r0;
  const T* g = in.g + r0;
  T* base = tile.data_ptr<T>();
  partial.reset(rows, Acc(0));
  const int64_t grain = std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(rows, 1));
  at::parallel_for(0, p.m, grain, [&](int64_t begin, int64_t end) {
    FlushedSums<T> da(partial.slot(), rows);
    for (int64_t j = begin; j < end; ++j) {
      T* x = base + j * rows;
      T* d = da.data();
      const int64_t cut = p.cut(j, r0, rows);
      const T b = p.beta[j];
      const T cg = kCol ? in.col_g[j] : T(0);
      const T cl = kCol ? finite_or_inf(in.col_lse[j]) : T(0);
      const T* nx = kFold ? next + j * rows : nullptr;
      T db = 0;
#pragma omp simd reduction(+ : db)
      for (int64_t i = 0; i < rows; ++i) {
        const T raw = x[i];
        const T s = raw * a[i] * b;
        T ds = g[i] * fast_exp(s - lse[i]);
        if (kCol) ds += cg * fast_exp(s - cl);
        ds = i == cut ? T(0) : ds;
        d[i] += ds * b * raw;
        db += ds * a[i] * raw;
        x[i] = kFold ? ds * a[i] * b + nx[i] : ds * a[i] * b;
      }
      da.row_done();
      dbeta[j] += db;
    }
    da.flush();
  });
  std::vector<Acc> sums(rows);
  partial.combine_sum(sums.data());
  for (int64_t i = 0; i < rows; ++i) dalpha[r0 + i] = static_cast<T>(sums[i]);
}

// The gradients of matryoshka.h, and with row_lse nullopt (the fused forward) the row lse too,
// formed on the same tiles before their weights: no recompute. Returns (row_lse, dq, dkeys,
// dalpha, dbeta). The block's P tiles are held at once: P tiles of the plain backward's budget.
template <typename T>
std::vector<at::Tensor> gradient_impl(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, const std::optional<at::Tensor>& row_lse,
    const at::Tensor& row_grad, const std::optional<at::Tensor>& col_lse,
    const std::optional<at::Tensor>& col_grad, bool exclude_diag, int64_t requested) {
  const int64_t n = q.size(0), m = keys.size(0), d = q.size(1), count = alpha.size(0);
  at::Tensor dq = at::zeros_like(q), dkeys = at::zeros_like(keys);
  at::Tensor dalpha = at::zeros_like(alpha), dbeta = at::zeros_like(beta);
  at::Tensor lse_out = row_lse ? *row_lse : at::full({count, n}, -kInf<T>, q.options());
  if (n == 0 || m == 0) return {lse_out, dq, dkeys, dalpha, dbeta};
  const int64_t block_rows = choose_block_rows(n, m, d, sizeof(T), false, requested);
  const Prefixes<T> prefixes(q, keys, alpha, beta, bounds, exclude_diag, block_rows);
  // -inf (no candidate) as +inf: no weight.
  at::Tensor rl = row_lse ? row_lse->clone() : at::empty({count, n}, q.options());
  at::Tensor cl = col_lse ? col_lse->clone() : at::Tensor();
  for (at::Tensor* t : {&rl, &cl}) {
    if (!t->defined() || !row_lse) continue;
    T* v = t->data_ptr<T>();
    for (int64_t i = 0; i < t->numel(); ++i) v[i] = finite_or_inf(v[i]);
  }
  std::vector<at::Tensor> buffers;
  for (int64_t p = 0; p < count; ++p) buffers.push_back(at::empty({m * block_rows}, q.options()));
  Partials<Acc> partial(block_rows);
  BlockLseScratch<T> scratch(row_lse ? 0 : block_rows);
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    std::vector<at::Tensor> tiles;
    for (int64_t p = 0; p < count; ++p) {
      tiles.push_back(buffers[p].narrow(0, 0, m * rows).view({m, rows}));
      if (p > 0) tiles[p].copy_(tiles[p - 1]);
      chunk_product(tiles[p], q, keys, r0, rows, bounds[p], bounds[p + 1], p == 0);
      if (row_lse) continue;
      T* out = lse_out.data_ptr<T>() + p * n + r0;
      prefix_block_lse(prefixes, p, r0, rows, tiles[p], static_cast<ColumnStats<T>*>(nullptr),
                       scratch, partial, out);
      T* w = rl.data_ptr<T>() + p * n + r0;
      for (int64_t i = 0; i < rows; ++i) w[i] = finite_or_inf(out[i]);
    }
    for (int64_t p = count - 1; p >= 0; --p) {
      const PrefixGrad<T> in{rl.data_ptr<T>() + p * n, row_grad.data_ptr<T>() + p * n,
                             cl.defined() ? cl.data_ptr<T>() + p * m : nullptr,
                             col_grad ? col_grad->data_ptr<T>() + p * m : nullptr};
      const T* next = p + 1 < count ? tiles[p + 1].data_ptr<T>() : nullptr;
      T* da = dalpha.data_ptr<T>() + p * n;
      T* db = dbeta.data_ptr<T>() + p * m;
      const Problem<T>& pp = prefixes.problem[p];
      if (in.col_lse && next) {
        prefix_weights<T, true, true>(pp, r0, rows, tiles[p], next, in, partial, da, db);
      } else if (in.col_lse) {
        prefix_weights<T, true, false>(pp, r0, rows, tiles[p], next, in, partial, da, db);
      } else if (next) {
        prefix_weights<T, false, true>(pp, r0, rows, tiles[p], next, in, partial, da, db);
      } else {
        prefix_weights<T, false, false>(pp, r0, rows, tiles[p], next, in, partial, da, db);
      }
      const int64_t lo = bounds[p], width = bounds[p + 1] - bounds[p];
      dq.narrow(0, r0, rows).narrow(1, lo, width).addmm_(tiles[p].t(), keys.narrow(1, lo, width));
      dkeys.narrow(1, lo, width).addmm_(tiles[p], q.narrow(0, r0, rows).narrow(1, lo, width));
    }
  }
  return {lse_out, dq, dkeys, dalpha, dbeta};
}

using OptTensor = std::optional<at::Tensor>;

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, " (the dtype of q), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

// q (N, D) float32/float64, keys (M, D), alpha (P, N), beta (P, M), bounds 0 = b_0 < ... < b_P
// <= D: the checks of every entry point.
void check_problem(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                   const at::Tensor& beta, const std::vector<int64_t>& bounds) {
  TORCH_CHECK(q.dim() == 2, "q must be 2-D (N, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "q must have dtype float32 or float64, got ", q.scalar_type());
  const auto dtype = q.scalar_type();
  const int64_t n = q.size(0), d = q.size(1);
  check_tensor(q, "q", dtype, {n, d});
  TORCH_CHECK(keys.dim() == 2, "keys must be 2-D (M, D), got shape ", keys.sizes());
  const int64_t m = keys.size(0);
  check_tensor(keys, "keys", dtype, {m, d});
  TORCH_CHECK(bounds.size() >= 2 && bounds[0] == 0, "bounds must be 0 followed by the prefix "
              "dims, got ", at::IntArrayRef(bounds));
  for (size_t c = 1; c < bounds.size(); ++c)
    TORCH_CHECK(bounds[c] > bounds[c - 1] && bounds[c] <= d, "bounds must increase strictly up "
                "to at most D = ", d, ", got ", at::IntArrayRef(bounds));
  const int64_t count = static_cast<int64_t>(bounds.size()) - 1;
  check_tensor(alpha, "alpha", dtype, {count, n});
  check_tensor(beta, "beta", dtype, {count, m});
}

void check_diagonal(const at::Tensor& q, const at::Tensor& keys, bool exclude_diag) {
  TORCH_CHECK(!exclude_diag || keys.size(0) == q.size(0), "exclude_diag needs M == N, got N = ",
              q.size(0), ", M = ", keys.size(0));
}

std::tuple<at::Tensor, OptTensor> forward_entry(const at::Tensor& q, const at::Tensor& keys,
                                                const at::Tensor& alpha, const at::Tensor& beta,
                                                const std::vector<int64_t>& bounds,
                                                bool exclude_diag, bool with_col_lse,
                                                int64_t block_rows) {
  check_problem(q, keys, alpha, beta, bounds);
  check_diagonal(q, keys, exclude_diag);
  const at::NoGradGuard no_grad;  // out= GEMMs on inputs that require grad
  return matryoshka_lse_forward(q, keys, alpha, beta, bounds, exclude_diag, with_col_lse,
                                block_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_entry(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, const at::Tensor& row_lse, const at::Tensor& row_grad,
    const OptTensor& col_lse, const OptTensor& col_grad, bool exclude_diag, int64_t block_rows) {
  check_problem(q, keys, alpha, beta, bounds);
  check_tensor(row_lse, "row_lse", q.scalar_type(), alpha.sizes());
  TORCH_CHECK(col_lse.has_value() == col_grad.has_value(),
              "col_lse and col_grad must be given together");
  if (col_lse) {
    check_tensor(*col_lse, "col_lse", q.scalar_type(), beta.sizes());
    check_tensor(*col_grad, "col_grad", q.scalar_type(), beta.sizes());
  }
  const at::NoGradGuard no_grad;
  return matryoshka_lse_backward(q, keys, alpha, beta, bounds, row_lse, row_grad, col_lse,
                                 col_grad, exclude_diag, block_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grad_entry(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, const at::Tensor& row_grad, bool exclude_diag,
    int64_t block_rows) {
  check_problem(q, keys, alpha, beta, bounds);
  check_tensor(row_grad, "row_grad", q.scalar_type(), alpha.sizes());
  check_diagonal(q, keys, exclude_diag);
  const at::NoGradGuard no_grad;
  return matryoshka_lse_forward_with_grad(q, keys, alpha, beta, bounds, row_grad, exclude_diag,
                                          block_rows);
}

}  // namespace

std::tuple<at::Tensor, std::optional<at::Tensor>> matryoshka_lse_forward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, bool exclude_diag, bool with_col_lse, int64_t block_rows) {
  return AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "matryoshka_lse_forward", [&] {
    return forward_impl<scalar_t>(q, keys, alpha, beta, bounds, exclude_diag, with_col_lse,
                                  block_rows);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> matryoshka_lse_backward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, const at::Tensor& row_lse, const at::Tensor& row_grad,
    const std::optional<at::Tensor>& col_lse, const std::optional<at::Tensor>& col_grad,
    bool exclude_diag, int64_t block_rows) {
  const auto g = AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "matryoshka_lse_backward", [&] {
    return gradient_impl<scalar_t>(q, keys, alpha, beta, bounds, row_lse, row_grad, col_lse,
                                   col_grad, exclude_diag, block_rows);
  });
  return {g[1], g[2], g[3], g[4]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
matryoshka_lse_forward_with_grad(const at::Tensor& q, const at::Tensor& keys,
                                 const at::Tensor& alpha, const at::Tensor& beta,
                                 const std::vector<int64_t>& bounds, const at::Tensor& row_grad,
                                 bool exclude_diag, int64_t block_rows) {
  const auto g = AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "matryoshka_lse_forward_with_grad",
                                            [&] {
    return gradient_impl<scalar_t>(q, keys, alpha, beta, bounds, std::nullopt, row_grad,
                                   std::nullopt, std::nullopt, exclude_diag, block_rows);
  });
  return {g[0], g[1], g[2], g[3], g[4]};
}

void register_matryoshka_ops(pybind11::module_& m) {
  namespace py = pybind11;
  using kernel_call = kernel_call_guard;
  m.def("matryoshka_lse_forward", &forward_entry, kernel_call(),
        "(row_lse (P, N), col_lse (P, M) or None) of every prefix of the product, one pass",
        py::arg("q"), py::arg("keys"), py::arg("alpha"), py::arg("beta"), py::arg("bounds"),
        py::kw_only(), py::arg("exclude_diag") = false, py::arg("with_col_lse") = false,
        py::arg("block_rows") = 0);
  m.def("matryoshka_lse_backward", &backward_entry, kernel_call(),
        "(dq, dkeys, dalpha, dbeta) of the prefix log-sum-exps, one product per chunk",
        py::arg("q"), py::arg("keys"), py::arg("alpha"), py::arg("beta"), py::arg("bounds"),
        py::arg("row_lse"), py::arg("row_grad"), py::arg("col_lse") = py::none(),
        py::arg("col_grad") = py::none(), py::kw_only(), py::arg("exclude_diag") = false,
        py::arg("block_rows") = 0);
  m.def("matryoshka_lse_forward_with_grad", &forward_with_grad_entry, kernel_call(),
        "(row_lse, dq, dkeys, dalpha, dbeta) in one pass over the tiles, no recompute",
        py::arg("q"), py::arg("keys"), py::arg("alpha"), py::arg("beta"), py::arg("bounds"),
        py::arg("row_grad"), py::kw_only(), py::arg("exclude_diag") = false,
        py::arg("block_rows") = 0);
}

}  // namespace fastcontrast
