// The shared-shift passes of the log-sum-exp kernels on CPU: one shift for every row and column
// (its bound, the forward's sums, the backward's weights).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/fast_exp.h"
#include "cpu/lse_math.h"
#include "cpu/runtime_options.h"

namespace fastcontrast {
namespace tiles {

// Shared-shift passes (gram.cpp; infonce.cpp's forward and column-term backward). By
// Cauchy-Schwarz no score exceeds
//   C = max_i |alpha_i| |q_i| * max_j |beta_j| |keys_j|,
// so one shift serves every row's and every column's sum with one exp per entry: with
// c = k ln2 <= C - kSharedShiftHeadroom (k the largest such integer),
// e_ij = exp(s_ij - c) <= e^40.7 (up to the rounding of s), S = sum exp(s - c), lse = c + log S.
// Precision: e_ij is 2^-k exp(s_ij) (fast_exp_shifted), exact in the shift, and c + log S is
// summed in double, so that an lse near 1 is not the difference of two numbers near 40 rounded to
// float (an ulp of 3.8e-6 there): the lse keeps the relative precision of the float sum S, as a
// per-row max shift does. The headroom keeps the sums in range (S <= M e^40.7, far below the
// float maximum e^88) while it lets every lse down to c - 39 >= C - 80 through: at CLIP's logit
// scale of 100 on unit rows C = 100 and the lse sit near 10 .. 40, which a shift of C itself
// (S < e^-40) would send to the exact passes. fast_exp_shifted flushes s - c below -86 (float;
// -707 double) to 0, so a sum S >= kMinSharedShiftSum loses less than M e^-46 (float) of
// itself; a smaller sum (all of a row's scores far below c: scores spread over more than ~80
// nats, no entry at all) sends the call to the exact two-pass kernels.
// The runtime option shared_shift (runtime_options.h) turns the shared-shift passes off: the
// exact passes only, for the tests and as a baseline.
inline bool shared_shift_enabled() { return runtime_options().shared_shift; }

template <typename T>
constexpr T kMinSharedShiftSum = sizeof(T) == 4 ? T(1e-17) : T(1e-250);
constexpr double kSharedShiftHeadroom = 40;
constexpr double kLn2 = 0.69314718055994530942;

// The shift c = k ln2 above: exp(s - c) = fast_exp_shifted(s, exp_shift), c in double.
// usable is false when the inputs are not finite or |k| > kMaxPow2Shift (scores beyond ~11000:
// the exact passes then).
template <typename T>
struct SharedShift {
  Pow2Shift<T> exp_shift;
  double c;
  bool usable;
};

// The Euclidean norm of each of the n rows of x (n x d, contiguous), in T.
template <typename T>
std::vector<T> row_norms(const T* x, int64_t n, int64_t d) {
  std::vector<T> norms(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    const T* row = x + i * d;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < d; ++k) sum += row[k] * row[k];
    norms[i] = std::sqrt(sum);
  }
  return norms;
}

// max_i norms_i |scale_i| (as torch's max: NaN when any product is NaN).
template <typename T>
T max_scaled(const std::vector<T>& norms, const T* scale) {
  T out = 0;
  for (size_t i = 0; i < norms.size(); ++i) {
    const T v = norms[i] * std::abs(scale[i]);
    if (std::isnan(v)) return v;
    out = std::max(out, v);
  }
  return out;
}

// The bound C and its shift, on the calling thread: an O((N + M) D) pass is cheaper than the
// barrier of a parallel ATen reduction whenever another process holds a core (tasks.h).
template <typename T>
SharedShift<T> shared_shift(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                            const at::Tensor& beta) {
  double bound = 0;
  if (q.size(0) > 0 && keys.size(0) > 0) {
    const int64_t d = q.size(1);
    const std::vector<T> q_norms = row_norms(q.data_ptr<T>(), q.size(0), d);
    const T q_max = max_scaled(q_norms, alpha.data_ptr<T>());
    const T key_max = keys.is_same(q)  // a Gram call
                          ? max_scaled(q_norms, beta.data_ptr<T>())
                          : max_scaled(row_norms(keys.data_ptr<T>(), keys.size(0), d),
                                       beta.data_ptr<T>());
    bound = static_cast<double>(q_max) * static_cast<double>(key_max);
  }
  const double k = std::floor((bound - kSharedShiftHeadroom) / kLn2);
  if (!(std::abs(k) <= kMaxPow2Shift)) return {pow2_shift<T>(0), 0.0, false};  // NaN too
  return {pow2_shift<T>(static_cast<int32_t>(k)), k * kLn2, true};
}

// The smallest shared-shift weight kept (shared_shift_weights): a normal number with its full
// precision.
template <typename T>
constexpr T kMinSharedWeight =
    std::numeric_limits<T>::min() / std::numeric_limits<T>::epsilon();

// Backward weights of the shared shift c: the gradient weight g_k exp(s - lse_k) of an entry of
// row (or column) k is exp(s - c) w_k with
//   w_k = g_k exp(c - lse_k),
// so a tile whose entries feed two log-sum-exps (a row's and a column's) takes one exp per entry,
// exp(s - c) (w_i + w_j). Fills w (n values) and returns true when every g_k is finite, every
// lse_k finite or -inf (w_k = 0) and c - lse_k <= 40 (as the forward's sums,
// S_k = exp(lse_k - c) >= e^-40: exp(s - c) then flushes only weights below e^-46 of the row's),
// and every w_k is finite and normal (kMinSharedWeight, or 0 where g_k is); false otherwise, and
// the caller uses the exact two-exp weights.
// w_k is computed in double (c - lse_k exactly) and rounded once.
template <typename T>
bool shared_shift_weights(double shift, const T* lse, const T* g, int64_t n, std::vector<T>& w) {
  w.resize(n);
  for (int64_t k = 0; k < n; ++k) {
    if (!std::isfinite(g[k]) || std::isnan(lse[k])) return false;
    if (lse[k] == -kInf<T>) {
      w[k] = T(0);
      continue;
    }
    if (!(shift - lse[k] <= 40.0)) return false;
    w[k] = static_cast<T>(g[k] * std::exp(shift - static_cast<double>(lse[k])));
    if (!std::isfinite(w[k]) || (g[k] != T(0) && !(std::abs(w[k]) >= kMinSharedWeight<T>)))
      return false;
  }
  return true;
}

// lse = c + log(sum) of the shared shift, in double (see above).
template <typename T>
T shared_lse(double shift, Acc sum) {
  return static_cast<T>(shift + std::log(sum));
}

// Whether every sum[k], k < n, is at least kMinSharedShiftSum (false for NaN).
template <typename T>
bool shared_sums_usable(const Acc* sum, int64_t n) {
  for (int64_t k = 0; k < n; ++k)
    if (!(sum[k] >= static_cast<Acc>(kMinSharedShiftSum<T>))) return false;
  return true;
}
}  // namespace tiles
}  // namespace fastcontrast
