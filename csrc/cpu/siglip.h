// SigLIP's pairwise sigmoid loss on CPU, in row blocks with bounded memory (see siglip.cpp).
//
//   z_ij = scale * <x_i, y_j> + bias,   y_ij = +1 if i == j else -1   (x: N images, y: M texts)
//   loss_i = sum_j softplus(-y_ij z_ij)                                 (= -sum_j log sigmoid(y_ij z_ij))
//   dz_ij  = g_i * d loss_i / d z_ij = -g_i y_ij sigmoid(-y_ij z_ij)
//   gx_i = sum_j dz_ij y_j,   gy_j = sum_i dz_ij x_i,   dz_total = sum_ij dz_ij
//
// The caller turns these into the input gradients: d image = scale * gx, d text = scale * gy,
// d scale = sum_i <gx_i, x_i>, d bias = dz_total. Nothing of size N x M is ever allocated: one
// R x M tile per block of R rows plus O(N + M) vectors.
//
// The functions assume validated arguments (register_siglip_ops checks them): CPU, contiguous,
// float32 or float64, x (N, D), y (M, D), row_grad (N,), all of x's dtype. block_rows = 0 picks R
// from the tile budget; a positive value forces it (tests use it to cover the multi-block path).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastcontrast {

// (loss (N,) or nullopt, gx (N, D) or nullopt, gy (M, D) or nullopt, dz_total 0-dim or nullopt):
// the per-row loss when with_loss, the gradient terms for per-row weights row_grad when
// row_grad is given, both from one pass over the tiles (no recompute).
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
siglip_tiles(const at::Tensor& x, const at::Tensor& y, double scale, double bias, bool with_loss,
             const std::optional<at::Tensor>& row_grad, bool need_gx, bool need_gy,
             int64_t block_rows);

}  // namespace fastcontrast
