// Masked log-sum-exp of a set against itself (a symmetric Gram matrix), and its gradient, on CPU.
//
//   s_ij = alpha_i * beta_j * <z_i, z_j>     (N rows, D features; alpha = c beta, so s = s^T)
//   entry (i, j) masked iff exclude_diag and j == i, or row_ids_i == col_ids_j >= 0 (ids given;
//   the caller guarantees that this relation is symmetric, e.g. row_ids = t, col_ids = arange
//   for an involution t)
//
// Only the tiles on and above the diagonal are computed, each for both its rows' and its
// columns' statistics (gram.cpp): forward N^2 D, backward 3 N^2 D multiply-adds instead of the
// 2 N^2 D and 4 N^2 D of masked_lse_* on (z, z). Same contract as infonce.h otherwise (validated
// CPU contiguous float32/float64 inputs, NaN / inf rules, block_rows = 0 picks the block size).
#pragma once

#include <ATen/ATen.h>

#include "cpu/infonce.h"

namespace fastcontrast {

// row_lse (N,): logsumexp_j s_ij over the unmasked entries; -inf where there are none.
at::Tensor gram_lse_forward(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                            const Mask& mask, int64_t block_rows);

// dz (N, D) = sum_j H_ij z_j with H_ij = alpha_i beta_j (dS_ij + dS_ji),
// dS_ij = row_grad_i exp(s_ij - row_lse_i), 0 where masked; an lse of -inf contributes 0.
at::Tensor gram_lse_backward(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                             const at::Tensor& row_lse, const at::Tensor& row_grad,
                             const Mask& mask, int64_t block_rows);

}  // namespace fastcontrast
