// The vectorised tile-row passes of the log-sum-exp kernels on CPU: each loops over the R queries
// of one tile row (one key), in the keys x queries layout of infonce.cpp and gram.cpp.
#pragma once

#include <cstdint>

#include "cpu/fast_exp.h"
#include "cpu/lse_math.h"

namespace fastcontrast {
namespace tiles {

// Tile-row kernels. x is one tile row (R raw products with key j), a = alpha[r0:r0+R], b = beta_j,
// so s_i = x_i * a_i * b. Each runs on a query range [i0, i1); callers skip the masked query.

// mx_i <- max(mx_i, s_i).
template <typename T>
void max_into(T* mx, const T* x, const T* a, T b, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const T s = x[i] * a[i] * b;
    mx[i] = s > mx[i] ? s : mx[i];
  }
}

// sum_i <- sum_i + exp(s_i - shift_i).
template <typename T, typename S>
void sum_exp_into(S* sum, const T* x, const T* a, T b, const T* shift, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) sum[i] += fast_exp(x[i] * a[i] * b - shift[i]);
}

// As sum_exp_into, and x_i <- b * exp(s_i - shift_i): the gradient weight overwrites the tile.
template <typename T, typename S>
void exp_weights_into(S* sum, T* x, const T* a, T b, const T* shift, int64_t i0, int64_t i1) {
#pragma omp simd
  for (int64_t i = i0; i < i1; ++i) {
    const T e = fast_exp(x[i] * a[i] * b - shift[i]);
    sum[i] += e;
    x[i] = e * b;
  }
}

// sum_i <- sum_i + e_i, e_i = exp(s_i - c) with one shift c for every query; returns sum_i e_i
// (the key's own sum of the same exps; over at most R queries, in vector lanes). kSided: the
// one-direction drops of the symmetric filter (sided_filter.h), code_i bit 0 leaves e_i out of
// sum_i, bit 1 out of the key's sum.
template <bool kSided = false, typename T>
T shared_shift_sums_into(T* sum, const T* x, const T* a, T b, const Pow2Shift<T>& shift,
                         int64_t i0, int64_t i1, const uint8_t* code = nullptr) {
  T total = 0;
#pragma omp simd reduction(+ : total)
  for (int64_t i = i0; i < i1; ++i) {
    const T e = fast_exp_shifted(x[i] * a[i] * b, shift);
    if constexpr (kSided) {
      sum[i] += (code[i] & 1) ? T(0) : e;
      total += (code[i] & 2) ? T(0) : e;
    } else {
      sum[i] += e;
      total += e;
    }
  }
  return total;
}

// s_i into sbuf and mx_i <- max(mx_i, s_i). Returns max_i s_i (for the column statistics).
template <typename T>
T scores_max_into(T* sbuf, T* mx, const T* x, const T* a, T b, int64_t i0, int64_t i1) {
  T row_max = -kInf<T>;
#pragma omp simd reduction(max : row_max)
  for (int64_t i = i0; i < i1; ++i) {
    const T s = x[i] * a[i] * b;
    sbuf[i] = s;
    mx[i] = s > mx[i] ? s : mx[i];
    row_max = s > row_max ? s : row_max;
  }
  return row_max;
}

// sum_i exp(s_i - shift).
template <typename T>
Acc sum_exp(const T* s, T shift, int64_t r) {
  Acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < r; ++i) sum += fast_exp(s[i] - shift);
  return sum;
}

}  // namespace tiles
}  // namespace fastcontrast
