// The Matryoshka log-sum-exps on CPU: every leading-dimension prefix of one product in one pass.
//
// With prefix bounds 0 = b_0 < b_1 < ... < b_P <= D (chunk c: dimensions b_c .. b_{c+1}):
//   S^p_ij = sum_{c <= p} <q_i[chunk c], keys_j[chunk c]>      (cumulative partial products)
//   s^p_ij = alpha_pi beta_pj S^p_ij, masked (-inf) iff exclude_diag and j == i
//   row_lse_pi = logsumexp_j s^p_ij,  col_lse_pj = logsumexp_i s^p_ij
// Backward, with dS^p_ij = g_pi exp(s^p_ij - row_lse_pi) + c_pj exp(s^p_ij - col_lse_pj):
//   G_c = sum_{p >= c} alpha_p beta_p dS^p      (the prefixes' weights folded: one per chunk)
//   dq[:, chunk c] = G_c keys[:, chunk c],  dkeys[:, chunk c] = G_c^T q[:, chunk c]
//   dalpha_pi = sum_j dS^p_ij beta_pj S^p_ij,   dbeta_pj = sum_i dS^p_ij alpha_pi S^p_ij
//
// Assumes validated arguments (register_matryoshka_ops checks them): CPU, contiguous, float32 or
// float64, q (N, D), keys (M, D), alpha (P, N), beta (P, M), all in q's dtype. block_rows = 0
// picks R from the tile budget; a positive value forces it (the tests' multi-block paths).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

namespace fastcontrast {

// (row_lse (P, N), col_lse (P, M) or nullopt).
std::tuple<at::Tensor, std::optional<at::Tensor>> matryoshka_lse_forward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, bool exclude_diag, bool with_col_lse, int64_t block_rows);

// (dq (N, D), dkeys (M, D), dalpha (P, N), dbeta (P, M)); recomputes the tiles.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> matryoshka_lse_backward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, const at::Tensor& row_lse, const at::Tensor& row_grad,
    const std::optional<at::Tensor>& col_lse, const std::optional<at::Tensor>& col_grad,
    bool exclude_diag, int64_t block_rows);

// One pass, no recompute (a reduced loss knows its row gradient up front): the row lse formed on
// the tiles that then give the gradients. Returns (row_lse, dq, dkeys, dalpha, dbeta).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
matryoshka_lse_forward_with_grad(const at::Tensor& q, const at::Tensor& keys,
                                 const at::Tensor& alpha, const at::Tensor& beta,
                                 const std::vector<int64_t>& bounds, const at::Tensor& row_grad,
                                 bool exclude_diag, int64_t block_rows);

}  // namespace fastcontrast
