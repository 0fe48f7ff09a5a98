// The gradient-weight passes of the backward on CPU (infonce.cpp): each overwrites one tile row x
// (key j, b = beta_j; s_i = x_i a_i b) with W_ji = b dS_ij over the R queries of the block, in
// vector lanes. kSided: the one-direction drops of the symmetric filter (sided_filter.h) applied
// by selection, code_i bit 0 leaving out the row term, bit 1 the column term (a NaN term reaches
// the direction that keeps it, as in the forward).
#pragma once

#include <cstdint>

#include "cpu/fast_exp.h"

namespace fastcontrast {
namespace tiles {

// Shared shift c (shared_shift.h): W_ji = b exp(s_i - c) (w_i + v), w the row weights
// g_i exp(c - lse_i) of the block, v the key's column weight.
template <bool kSided, typename T>
void shared_weights_row(T* x, const T* a, T b, const Pow2Shift<T>& shift, const T* w, T v,
                        const uint8_t* code, int64_t rows) {
#pragma omp simd
  for (int64_t i = 0; i < rows; ++i) {
    T wi = w[i], vj = v;
    if constexpr (kSided) {
      wi = (code[i] & 1) ? T(0) : wi;
      vj = (code[i] & 2) ? T(0) : vj;
    }
    x[i] = b * fast_exp_shifted(x[i] * a[i] * b, shift) * (wi + vj);
  }
}

// Two exps: W_ji = b (g_i exp(s_i - lse_i) + cg exp(s_i - cl)), cl the key's column lse.
template <bool kSided, typename T>
void two_exp_weights_row(T* x, const T* a, T b, const T* g, const T* lse, T cg, T cl,
                         const uint8_t* code, int64_t rows) {
#pragma omp simd
  for (int64_t i = 0; i < rows; ++i) {
    const T s = x[i] * a[i] * b;
    T row = g[i] * fast_exp(s - lse[i]), col = cg * fast_exp(s - cl);
    if constexpr (kSided) {
      row = (code[i] & 1) ? T(0) : row;
      col = (code[i] & 2) ? T(0) : col;
    }
    x[i] = b * (row + col);
  }
}

// No column term: W_ji = b g_i exp(s_i - lse_i).
template <bool kSided, typename T>
void row_weights_row(T* x, const T* a, T b, const T* g, const T* lse, const uint8_t* code,
                     int64_t rows) {
#pragma omp simd
  for (int64_t i = 0; i < rows; ++i) {
    T w = b * g[i] * fast_exp(x[i] * a[i] * b - lse[i]);
    if constexpr (kSided) w = (code[i] & 1) ? T(0) : w;
    x[i] = w;
  }
}

}  // namespace tiles
}  // namespace fastcontrast
