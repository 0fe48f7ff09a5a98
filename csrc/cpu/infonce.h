// Fused masked log-sum-exp over a scaled similarity matrix, and its gradient, on CPU.
//
//   s_ij = alpha_i * beta_j * <q_i, keys_j>        (N queries, M keys, D features)
//   entry (i, j) is masked (-inf) iff exclude_diag and j == i + diag_offset,
//                                  or row_ids_i == col_ids_j >= 0 (when ids are given)
//
// The host passes raw q / keys and folds L2 normalisation and temperature into the scales
// (alpha_i = (1 / tau) / ||q_i||, beta_j = 1 / ||keys_j||), so no normalised copy is ever made.
// Queries are processed in blocks of R: an M x R score tile comes from one ATen GEMM, fused
// elementwise passes reduce it and overwrite it with the gradient weights, and two more GEMMs turn
// those weights into dq and dkeys (infonce.cpp). Extra memory: one tile plus O(N + M) vectors.
//
// The functions below assume validated arguments (bindings.cpp checks them): CPU, contiguous,
// float32 or float64, q (N, D), keys (M, D), alpha (N,), beta (M,), every tensor in q's dtype.
// block_rows = 0 picks R from the tile budget (16 MiB at N = M = 16384, D = 256 fp32); a positive
// value forces R (the tests use it to cover the multi-block paths with small inputs).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "cpu/row_filter.h"

namespace fastcontrast {

// Which entries of the score matrix are excluded. row_ids (N,) and col_ids (M,) are int64 and given
// together or not at all; a negative id matches nothing. (A scale that is not finite and positive
// is folded into the operands when ids are given, see infonce.cpp.)
struct Mask {
  bool exclude_diag = false;
  int64_t diag_offset = 0;
  std::optional<at::Tensor> row_ids;
  std::optional<at::Tensor> col_ids;
  std::optional<RowFilter> filter;  // false-negative filter (row_filter.h), or none
};

// Returns (row_lse (N,), col_lse (M,) or nullopt): log-sum-exp of each row / column over its
// unmasked entries; -inf where there are none.
std::tuple<at::Tensor, std::optional<at::Tensor>> masked_lse_forward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const Mask& mask, bool with_col_lse, int64_t block_rows);

// Recomputes the tiles. dS_ij = row_grad_i exp(s_ij - row_lse_i) + col_grad_j exp(s_ij - col_lse_j)
// (second term only with col_lse), 0 where masked; an lse of -inf contributes 0.
// dq_i = alpha_i sum_j dS_ij beta_j keys_j, dkeys_j = beta_j sum_i dS_ij alpha_i q_i.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> masked_lse_backward(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const at::Tensor& row_lse, const at::Tensor& row_grad, const std::optional<at::Tensor>& col_lse,
    const std::optional<at::Tensor>& col_grad, const Mask& mask, bool need_dq, bool need_dkeys,
    int64_t block_rows);

// One pass, no recompute: row_lse = logaddexp(own row lse, extra_lse) and the row-only gradient
// of masked_lse_backward with that row_lse. Returns (row_lse, dq or nullopt, dkeys or nullopt).
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>>
masked_lse_forward_with_grad(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                             const at::Tensor& beta, const at::Tensor& row_grad, const Mask& mask,
                             const std::optional<at::Tensor>& extra_lse,
                             bool need_dq, bool need_dkeys, int64_t block_rows);

// The number of candidates of each query that mask.filter drops (int64 (N,); with its column
// rule (N + M,), then each key's): the tiles of the forward pass with the filter and no exps
// (false_negatives.cpp).
at::Tensor masked_lse_dropped(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                              const at::Tensor& beta, const Mask& mask, int64_t block_rows);

// The block plan of masked_lse_forward_with_grad (with gradients, default block size) for an
// N x M x D problem of elements of elem_size bytes on at::get_num_threads() threads: rows per
// query block, tiles in memory at once, their bytes together, and the budget of one tile.
struct FusedPlan {
  int64_t block_rows, slots, tile_bytes, tile_budget;
};
FusedPlan masked_lse_fused_plan(int64_t n, int64_t m, int64_t d, int64_t elem_size);

}  // namespace fastcontrast
