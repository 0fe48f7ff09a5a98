// Similarity distillation on CPU (see distill.cpp): the student's and the teacher's scores
// recomputed in row blocks, never an N x M matrix.
//
//   s_ij = s_scale <sq_i, sk_j>  (student),   t_ij = t_scale <tq_i, tk_j>  (teacher; its own D)
//   row stats (3, N): lse^S_i = logsumexp_j s_ij, lse^T_i = logsumexp_j t_ij,
//                     w_i = sum_j softmax_j(t_i.)_j s_ij           (loss_i = lse^S_i - w_i)
//   col stats (3, M): the same over i for each column j (the key -> query direction)
//   backward: G_ij = a_i e^{s_ij - lse^S_i} - g_i e^{t_ij - lse^T_i}
//                  + ca_j e^{s_ij - clse^S_j} - c_j e^{t_ij - clse^T_j}    (c: column term)
//             a / ca: the student weights (row_student_grad / col_student_grad), g / c when
//             not given; distinct for DistillClipLoss's contrastive + distillation sum
//             gq_i = sum_j G_ij sk_j,   gk_j = sum_i G_ij sq_i
// The caller scales gq, gk by s_scale (and forms d s_scale = sum_i <gq_i, sq_i>).
//
// The functions assume validated arguments (register_distill_ops checks them): CPU,
// contiguous, one dtype (float32 or float64), sq (N, D), sk (M, D), tq (N, DT), tk (M, DT).
// block_rows = 0 picks R from the tile budget; a positive value forces it (tests).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastcontrast {

// (row stats (3, N), col stats (3, M) or nullopt, gq, gk): with row_grad (not with_cols) also
// gq / gk of the row direction (need_gq / need_gk) from the same tiles, no recompute.
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::optional<at::Tensor>>
distill_forward(const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq,
                const at::Tensor& tk, double s_scale, double t_scale, bool with_cols,
                const std::optional<at::Tensor>& row_grad,
                const std::optional<at::Tensor>& row_student_grad, bool need_gq, bool need_gk,
                int64_t block_rows);

// (gq (N, D) or nullopt, gk (M, D) or nullopt), recomputing both score tiles.
std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>> distill_backward(
    const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq, const at::Tensor& tk,
    double s_scale, double t_scale, const at::Tensor& row_stats, const at::Tensor& row_grad,
    const std::optional<at::Tensor>& col_stats, const std::optional<at::Tensor>& col_grad,
    const std::optional<at::Tensor>& row_student_grad,
    const std::optional<at::Tensor>& col_student_grad, bool need_gq, bool need_gk,
    int64_t block_rows);

}  // namespace fastcontrast
