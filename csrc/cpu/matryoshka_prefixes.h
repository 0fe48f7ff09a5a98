// The P prefixes of a Matryoshka call on CPU (matryoshka.cpp): one Problem per prefix over the
// same inputs, and each prefix's per-query bound of its scores for the one-pass row sums.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/lse_tiles.h"

namespace fastcontrast {
namespace tiles {

// (P, n): |x_i[:b_{p+1}]| for the rows of x, on the calling thread (no ATen reduction: tasks.h).
template <typename T>
std::vector<T> prefix_norms(const at::Tensor& x, const std::vector<int64_t>& bounds) {
  const int64_t n = x.size(0), d = x.size(1), count = static_cast<int64_t>(bounds.size()) - 1;
  std::vector<T> out(static_cast<size_t>(count * n));
  const T* base = x.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) {
    T sum = 0;
    for (int64_t p = 0; p < count; ++p) {
      T part = 0;
#pragma omp simd reduction(+ : part)
      for (int64_t k = bounds[p]; k < bounds[p + 1]; ++k) part += base[i * d + k] * base[i * d + k];
      sum += part;
      out[p * n + i] = std::sqrt(sum);
    }
  }
  return out;
}

// The P per-prefix Problems over the same inputs (row p of alpha / beta as the scales), and each
// prefix's per-query bound of its scores (Cauchy-Schwarz): c_pi = |alpha_pi| |q_i[:b_{p+1}]|
// max_j |beta_pj| |keys_j[:b_{p+1}]|; usable[p] false where a bound is not finite.
template <typename T>
struct Prefixes {
  int64_t count;
  std::vector<at::Tensor> alphas, betas;
  std::vector<Problem<T>> problem;
  std::vector<std::vector<T>> bound;
  std::vector<char> usable;
  Prefixes(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
           const at::Tensor& beta, const std::vector<int64_t>& bounds, bool exclude_diag)
      : count(alpha.size(0)), bound(count) {
    alphas.reserve(count);  // the Problems hold references to these
    betas.reserve(count);
    problem.reserve(count);
    const Mask mask{exclude_diag, 0, std::nullopt, std::nullopt};
    const int64_t n = q.size(0), m = keys.size(0);
    const std::vector<T> qn = prefix_norms<T>(q, bounds);
    const std::vector<T> kn = keys.is_same(q) ? qn : prefix_norms<T>(keys, bounds);
    for (int64_t p = 0; p < count; ++p) {
      alphas.push_back(alpha.select(0, p));
      betas.push_back(beta.select(0, p));
      problem.emplace_back(q, keys, alphas.back(), betas.back(), mask, true, 0);
      const T* a = problem.back().alpha;
      const T* b = problem.back().beta;
      T key_max = 0;
      bool ok = n > 0 && m > 0;
      for (int64_t j = 0; j < m; ++j) {
        const T v = kn[p * m + j] * std::abs(b[j]);
        ok = ok && !std::isnan(v);
        key_max = std::max(key_max, v);
      }
      bound[p].resize(n);
      for (int64_t i = 0; i < n; ++i) {
        bound[p][i] = static_cast<T>(std::abs(a[i]) * qn[p * n + i] * key_max);
        ok = ok && std::isfinite(bound[p][i]);
      }
      usable.push_back(ok && std::isfinite(key_max));
    }
  }
};

}  // namespace tiles
}  // namespace fastcontrast
