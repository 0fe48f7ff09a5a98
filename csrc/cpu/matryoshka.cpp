// The Matryoshka log-sum-exps on CPU (see matryoshka.h for the maths and the contract).
//
// Queries in blocks of R rows, the keys x queries tile layout of infonce.cpp, and the task graph
// of the one-pass kernels (block_tasks.h): every call is one task region. A block's task holds P
// tiles, the prefix tiles S^0 .. S^{P-1}, over every key: S^0 = keys[:, chunk 0] @ q_blk[:, chunk
// 0]^T, S^p = S^{p-1} + keys[:, chunk p] @ q_blk[:, chunk p]^T, so the P prefixes cost the FLOPs
// of one product. The GEMMs run a step of keys at a time for all prefixes, and each prefix's row
// sums take that step while it is in cache: one pass and one exp per prefix and entry, shifted by
// the query's bound of its prefix scores (bounded sums below), the exact two passes only where
// that bound is unusable. The weights then walk the prefixes from the longest down, tile row by
// tile row: tile p is overwritten with G_p = alpha_p beta_p dS^p + G_{p+1}, the gradient weight
// of chunk p, so each chunk gets one pair of gradient GEMMs whatever P is: dq[block, chunk p] in
// the block's task, dkeys[key chunk, chunk p] in the (block, key chunk) tasks, in block order.
// The forward's column statistics (symmetric losses) merge in those chunk tasks too.
//
// Why: with each prefix's passes a parallel region of their own (a barrier each, P of them per
// block and pass) Matryoshka took 1.9x the plain loss at N = 16384 on a quiet 2-core EPYC and
// ~4x on a busy one, where separate calls take ~2x.
#include "cpu/matryoshka.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/block_tasks.h"
#include "cpu/fast_exp.h"
#include "cpu/grid_tiles.h"
#include "cpu/lse_tiles.h"
#include "cpu/matryoshka_prefixes.h"
#include "cpu/outputs.h"

namespace fastcontrast {
namespace {

using namespace tiles;  // NOLINT: the shared pieces (lse_tiles.h, block_tasks.h)

// The backward's inputs and outputs (absent in the forward): row_lse nullptr where the pass
// forms the row lse itself (the fused forward); lse as finite_or_inf, col_lse nullptr without
// the column term.
template <typename T>
struct Grad {
  const T* row_lse;   // (P, N) or nullptr
  const T* row_grad;  // (P, N)
  const T* col_lse;   // (P, M) or nullptr
  const T* col_grad;
  at::Tensor dq, dkeys;
  T* dalpha;  // (P, N)
  T* dbeta;   // (P, M)
};

// The geometry of a call: R rows per block, key chunks of the updates, keys per step of the
// block's pass, slots. A slot holds P tiles of M x R, and the slots together no more than P
// times the in-flight budget of the plain one-pass kernel, 1.5 tile budgets (R halved for that,
// block_tasks.h): the plain kernel's R on 2 threads (R = 128 at N = M = 16384, D = 256 fp32,
// 96 MiB of tiles; the materialised per-prefix losses hold P N x M logits and their softmax).
// One tile budget per prefix (R = 64 there) left the narrow chunk GEMMs ~1.4x slower.
struct Plan {
  int64_t rows, nb, chunk, nc, step, slots;
  Plan(int64_t n, int64_t m, int64_t d, int64_t elem, int64_t count, bool updates,
       int64_t requested) {
    rows = choose_block_rows(n, m, d, elem, /*large_tile=*/false, requested);
    if (requested <= 0)
      rows = rows_in_budget(n, m, elem, task_rows(n, rows, 0), count,
                            count * 3 * tile_budget(n, m, d, elem, /*large_tile=*/false) / 2);
    nb = (n + rows - 1) / rows;
    chunk = chunk_keys(rows, elem, requested);
    nc = updates ? (m + chunk - 1) / chunk : 0;
    step = chunk_keys(rows * count, elem, requested);
    slots = tile_slots(nb);
  }
};

// The P prefix tiles of a block (views of its slot's buffers): tile[p] (M, rows) = S^p.
std::vector<at::Tensor> prefix_tiles(std::vector<at::Tensor>& buffers, int64_t count, int64_t m,
                                     int64_t rows, int64_t block_rows, const at::Tensor& like) {
  if (buffers.empty())
    for (int64_t p = 0; p < count; ++p) buffers.push_back(at::empty({m * block_rows}, like.options()));
  std::vector<at::Tensor> out;
  for (int64_t p = 0; p < count; ++p) out.push_back(buffers[p].narrow(0, 0, m * rows).view({m, rows}));
  return out;
}

// The row lse of every prefix over the block, formed while the prefix tiles are computed a step
// of keys at a time: exps shifted by the query's score bound c_pi (never below a score, so no
// overflow), summed in T over kFlushRows keys, then in double (FlushedSums). A prefix whose bound
// is unusable, or where some row's sum is so small (its scores far below the bound, e.g. large
// unnormalised features) that the shifted exps would lose precision, or that has no entry, gets
// the exact two passes (serial_block_lse) afterwards. out (P rows of stride n) or nullptr: the
// tiles alone.
template <typename T>
void block_tiles(const Prefixes<T>& pre, const at::Tensor& q, const at::Tensor& keys,
                 const std::vector<int64_t>& bounds, int64_t r0, int64_t rows, int64_t step,
                 std::vector<at::Tensor>& tile, T* out) {
  const int64_t m = keys.size(0), n = q.size(0), count = pre.count;
  std::vector<Acc> sum(static_cast<size_t>(count * rows), Acc(0));
  std::vector<FlushedSums<T>> acc;
  for (int64_t p = 0; p < count; ++p) acc.emplace_back(sum.data() + p * rows, rows);
  const at::Tensor q_blk = q.narrow(0, r0, rows);
  for (int64_t j0 = 0; j0 < m; j0 += step) {
    const int64_t len = std::min(step, m - j0);
    for (int64_t p = 0; p < count; ++p) {
      const int64_t lo = bounds[p], width = bounds[p + 1] - bounds[p];
      at::Tensor part = tile[p].narrow(0, j0, len);
      const at::Tensor k = keys.narrow(0, j0, len).narrow(1, lo, width);
      const at::Tensor x = q_blk.narrow(1, lo, width).t();
      at::mm_out(part, k, x);  // chunk p's product, S^{p-1} added below (no copy, no beta = 1)
      const bool sums = out && pre.usable[p];
      const Problem<T>& pp = pre.problem[p];
      const T* a = pp.alpha + r0;
      const T* c = pre.bound[p].data() + r0;
      T* base = tile[p].data_ptr<T>();
      const T* prev = p > 0 ? tile[p - 1].data_ptr<T>() : nullptr;
      for (int64_t j = j0; j < j0 + len; ++j) {
        if (prev) {
          T* x_j = base + j * rows;
          const T* y_j = prev + j * rows;
#pragma omp simd
          for (int64_t i = 0; i < rows; ++i) x_j[i] += y_j[i];
        }
        if (!sums) continue;
        const int64_t cut = pp.cut(j, r0, rows);
        sum_exp_into(acc[p].data(), base + j * rows, a, pp.beta[j], c, 0, cut);
        sum_exp_into(acc[p].data(), base + j * rows, a, pp.beta[j], c, cut + 1, rows);
        acc[p].row_done();
      }
    }
  }
  if (!out) return;
  constexpr Acc kSmallest = 1e-25;  // the largest exp above ~1e-29: a normal float
  for (int64_t p = 0; p < count; ++p) {
    acc[p].flush();
    const Acc* s = sum.data() + p * rows;
    bool bounded = pre.usable[p];
    for (int64_t i = 0; bounded && i < rows; ++i)
      bounded = s[i] >= kSmallest || std::isnan(s[i]);
    T* o = out + p * n + r0;
    if (!bounded) {
      serial_block_lse(pre.problem[p], r0, rows, tile[p], o);
      continue;
    }
    for (int64_t i = 0; i < rows; ++i) o[i] = lse_from(pre.bound[p][r0 + i], s[i]);
  }
}

// One tile row of prefix p, in place: x <- alpha_p beta_p dS^p + next (G_{p+1}, or nothing for
// the longest prefix); d (the block's dalpha_p partial sums) accumulated; returns the row's
// dbeta_pj. x: S^p of key j, a: alpha_p of the block, lse / g: the prefix's row lse and
// gradients over the block, cg / cl: the key's column gradient and lse (kCol).
template <typename T, bool kCol, bool kFold>
T prefix_weights(T* x, const T* next, const T* a, const T* lse, const T* g, T b, T cg, T cl,
                 int64_t cut, int64_t rows, T* d) {
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
    x[i] = kFold ? ds * a[i] * b + next[i] : ds * a[i] * b;
  }
  return db;
}

// The block's gradient weights over its P tiles, tile row by tile row (the longest prefix
// first), dalpha of the block, its dbeta partials (P, M) into part; lse: the block's row lse as
// finite_or_inf, prefix p's at lse + p * stride.
template <typename T, bool kCol>
void block_weights(const Prefixes<T>& pre, const Grad<T>& grad, const T* lse, int64_t stride,
                   int64_t n, int64_t r0, int64_t rows, std::vector<at::Tensor>& tile, T* part) {
  const int64_t count = pre.count, m = pre.problem[0].m;
  std::vector<Acc> da(static_cast<size_t>(count * rows), Acc(0));
  std::vector<FlushedSums<T>> acc;
  std::vector<T*> base;
  for (int64_t p = 0; p < count; ++p) {
    acc.emplace_back(da.data() + p * rows, rows);
    base.push_back(tile[p].data_ptr<T>());
  }
  for (int64_t j = 0; j < m; ++j) {
    const int64_t cut = pre.problem[0].cut(j, r0, rows);
    for (int64_t p = count - 1; p >= 0; --p) {
      const Problem<T>& pp = pre.problem[p];
      const T cg = kCol ? grad.col_grad[p * m + j] : T(0);
      const T cl = kCol ? grad.col_lse[p * m + j] : T(0);
      T* x = base[p] + j * rows;
      const T* a = pp.alpha + r0;
      const T* l = lse + p * stride;
      const T* g = grad.row_grad + p * n + r0;
      part[p * m + j] =
          p + 1 < count
              ? prefix_weights<T, kCol, true>(x, base[p + 1] + j * rows, a, l, g, pp.beta[j], cg,
                                              cl, cut, rows, acc[p].data())
              : prefix_weights<T, kCol, false>(x, nullptr, a, l, g, pp.beta[j], cg, cl, cut,
                                               rows, acc[p].data());
      acc[p].row_done();
    }
  }
  for (int64_t p = 0; p < count; ++p) {
    acc[p].flush();
    for (int64_t i = 0; i < rows; ++i)
      grad.dalpha[p * n + r0 + i] = static_cast<T>(da[p * rows + i]);
  }
}

// The gradient rows' dimensions from the longest prefix on (b_P < D): no prefix reads them.
inline void zero_tail(at::Tensor rows, int64_t from) {
  if (from < rows.size(1)) rows.narrow(1, from, rows.size(1) - from).zero_();
}

// A block's task: its prefix tiles and row lse (out, or nullptr), then with grad its weights,
// dalpha, dbeta partials (part) and dq[block] = G_p^T keys[:, chunk p] for each chunk.
template <typename T>
void block_task_run(const Prefixes<T>& pre, const at::Tensor& q, const at::Tensor& keys,
                    const std::vector<int64_t>& bounds, const Plan& plan, int64_t r0,
                    int64_t rows, std::vector<at::Tensor>& tile, T* out, Grad<T>* grad, T* part) {
  const int64_t n = q.size(0), count = pre.count;
  block_tiles(pre, q, keys, bounds, r0, rows, plan.step, tile, out);
  if (!grad) return;
  const T* lse = grad->row_lse ? grad->row_lse + r0 : nullptr;
  int64_t stride = n;
  std::vector<T> local;
  if (!lse) {  // the lse just formed, as finite_or_inf
    local.resize(static_cast<size_t>(count * rows));
    for (int64_t p = 0; p < count; ++p)
      for (int64_t i = 0; i < rows; ++i) local[p * rows + i] = finite_or_inf(out[p * n + r0 + i]);
    lse = local.data();
    stride = rows;
  }
  if (grad->col_lse) {
    block_weights<T, true>(pre, *grad, lse, stride, n, r0, rows, tile, part);
  } else {
    block_weights<T, false>(pre, *grad, lse, stride, n, r0, rows, tile, part);
  }
  for (int64_t p = 0; p < count; ++p) {
    const int64_t lo = bounds[p], width = bounds[p + 1] - bounds[p];
    at::Tensor dq_part = grad->dq.narrow(0, r0, rows).narrow(1, lo, width);
    at::mm_out(dq_part, tile[p].t(), keys.narrow(1, lo, width));
  }
  zero_tail(grad->dq.narrow(0, r0, rows), bounds.back());
}

// The update of key chunk c0 .. c1 by a block (in block order, block 0 first): with grad
// dkeys[chunk, chunk p] (+)= G_p[chunk] @ q[block, chunk p] and dbeta[:, chunk] (+)= the block's
// partials; with cols each prefix's column statistics merged with the block's tile rows.
template <typename T>
void chunk_task_run(const Prefixes<T>& pre, const at::Tensor& q, const std::vector<int64_t>& bounds,
                    int64_t b, int64_t r0, int64_t rows, int64_t c0, int64_t c1,
                    std::vector<at::Tensor>& tile, Grad<T>* grad, const T* part,
                    std::vector<ColumnStats<T>>* cols) {
  const int64_t count = pre.count, m = pre.problem[0].m;
  if (grad) {
    for (int64_t p = 0; p < count; ++p) {
      const int64_t lo = bounds[p], width = bounds[p + 1] - bounds[p];
      at::Tensor dk = grad->dkeys.narrow(0, c0, c1 - c0).narrow(1, lo, width);
      const at::Tensor w = tile[p].narrow(0, c0, c1 - c0);
      const at::Tensor x = q.narrow(0, r0, rows).narrow(1, lo, width);
      if (b == 0) {
        at::mm_out(dk, w, x);
      } else {
        dk.addmm_(w, x);
      }
      T* db = grad->dbeta + p * m;
      for (int64_t j = c0; j < c1; ++j) db[j] = (b == 0 ? T(0) : db[j]) + part[p * m + j];
    }
    if (b == 0) zero_tail(grad->dkeys.narrow(0, c0, c1 - c0), bounds.back());
  }
  if (!cols) return;
  std::vector<T> mx(static_cast<size_t>(rows), -kInf<T>);  // the per-query maxima: unused here
  for (int64_t p = 0; p < count; ++p) {
    const Problem<T>& pp = pre.problem[p];
    const T* base = tile[p].data_ptr<T>();
    for (int64_t j = c0; j < c1; ++j)
      (*cols)[p].merge(j, mx.data(), base + j * rows, pp.alpha + r0, pp.beta[j],
                       pp.cut(j, r0, rows), rows);
  }
}

// Every block's task and its chunk updates as one task region (block_tasks.h).
template <typename T>
void run_blocks(const Prefixes<T>& pre, const at::Tensor& q, const at::Tensor& keys,
                const std::vector<int64_t>& bounds, T* out, Grad<T>* grad,
                std::vector<ColumnStats<T>>* cols, int64_t requested) {
  const int64_t n = q.size(0), m = keys.size(0), count = pre.count;
  const Plan plan(n, m, q.size(1), sizeof(T), count, grad || cols, requested);
  TaskGraph graph(plan.nb * (1 + plan.nc));
  add_block_edges(graph, plan.nb, plan.nc, plan.slots);
  std::vector<std::vector<at::Tensor>> buffers(static_cast<size_t>(plan.slots));
  std::vector<std::vector<T>> parts(static_cast<size_t>(grad ? plan.slots : 0));
  graph.run([&](int64_t task, int64_t) {
    const auto [b, k, slot] = block_task(task, plan.nc, plan.slots);
    const int64_t r0 = b * plan.rows, rows = std::min(plan.rows, n - r0);
    std::vector<at::Tensor> tile = prefix_tiles(buffers[slot], count, m, rows, plan.rows, q);
    if (grad && k < 0) parts[slot].resize(static_cast<size_t>(count * m));  // then only read
    T* part = grad ? parts[slot].data() : nullptr;
    if (k < 0) {
      block_task_run(pre, q, keys, bounds, plan, r0, rows, tile, out, grad, part);
    } else {
      chunk_task_run(pre, q, bounds, b, r0, rows, k * plan.chunk,
                     std::min(m, (k + 1) * plan.chunk), tile, grad, part, cols);
    }
  });
}

template <typename T>
std::tuple<at::Tensor, std::optional<at::Tensor>> forward_impl(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, bool exclude_diag, bool with_col, int64_t requested) {
  const int64_t n = q.size(0), m = keys.size(0), count = alpha.size(0);
  std::optional<at::Tensor> col_lse;
  if (n == 0 || m == 0) {  // no entry: every lse is -inf
    if (with_col) col_lse = at::full({count, m}, -kInf<T>, q.options());
    return {at::full({count, n}, -kInf<T>, q.options()), col_lse};
  }
  const Prefixes<T> pre(q, keys, alpha, beta, bounds, exclude_diag);
  at::Tensor row_lse = new_output({count, n}, q.options());
  std::vector<ColumnStats<T>> cols(with_col ? count : 0, ColumnStats<T>(m));
  run_blocks<T>(pre, q, keys, bounds, row_lse.data_ptr<T>(), nullptr, with_col ? &cols : nullptr,
                requested);
  if (with_col) {
    col_lse = new_output({count, m}, q.options());
    T* c = col_lse->data_ptr<T>();
    for (int64_t p = 0; p < count; ++p)
      for (int64_t j = 0; j < m; ++j) c[p * m + j] = cols[p].lse(j);
  }
  return {row_lse, col_lse};
}

// A copy of an lse with -inf (no candidate) as +inf: no weight.
template <typename T>
at::Tensor weights_lse(const at::Tensor& lse) {
  at::Tensor out = lse.clone();
  T* v = out.data_ptr<T>();
  for (int64_t i = 0; i < out.numel(); ++i) v[i] = finite_or_inf(v[i]);
  return out;
}

// The gradients of matryoshka.h, and with row_lse nullopt (the fused forward) the row lse too,
// formed on the same tiles before their weights: no recompute. Returns (row_lse, dq, dkeys,
// dalpha, dbeta).
template <typename T>
std::vector<at::Tensor> gradient_impl(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, const std::optional<at::Tensor>& row_lse,
    const at::Tensor& row_grad, const std::optional<at::Tensor>& col_lse,
    const std::optional<at::Tensor>& col_grad, bool exclude_diag, int64_t requested) {
  const int64_t n = q.size(0), m = keys.size(0), count = alpha.size(0);
  if (n == 0 || m == 0) {
    const at::Tensor lse = row_lse ? *row_lse : at::full({count, n}, -kInf<T>, q.options());
    return {lse, at::zeros_like(q), at::zeros_like(keys), at::zeros_like(alpha),
            at::zeros_like(beta)};
  }
  const Prefixes<T> pre(q, keys, alpha, beta, bounds, exclude_diag);
  at::Tensor lse_out = row_lse ? *row_lse : new_output({count, n}, q.options());
  const at::Tensor rl = row_lse ? weights_lse<T>(*row_lse) : at::Tensor();
  const at::Tensor cl = col_lse ? weights_lse<T>(*col_lse) : at::Tensor();
  at::Tensor dalpha = new_output(alpha.sizes(), q.options());
  at::Tensor dbeta = new_output(beta.sizes(), q.options());
  Grad<T> grad{row_lse ? rl.data_ptr<T>() : nullptr, row_grad.data_ptr<T>(),
               col_lse ? cl.data_ptr<T>() : nullptr,
               col_grad ? col_grad->data_ptr<T>() : nullptr,
               new_output(q.sizes(), q.options()), new_output(keys.sizes(), q.options()),
               dalpha.data_ptr<T>(), dbeta.data_ptr<T>()};
  run_blocks<T>(pre, q, keys, bounds, row_lse ? nullptr : lse_out.data_ptr<T>(), &grad, nullptr,
                requested);
  return {lse_out, grad.dq, grad.dkeys, dalpha, dbeta};
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

}  // namespace fastcontrast
