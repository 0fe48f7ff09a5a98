// The Python entry points of similarity distillation on CPU (distill.h): argument checks, no
// grad mode, registration.
#include <torch/extension.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cpu/distill.h"
#include "cpu/host_threads.h"
#include "register_ops.h"

namespace fastcontrast {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_matrix(const char* name, const at::Tensor& t, const at::Tensor& ref, int64_t rows,
                  int64_t cols) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, name,
              " must have dtype float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), name, " must have dtype ",
              ref.scalar_type(), " (the dtype of sq), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
  TORCH_CHECK(t.dim() == 2 || (rows >= 0 && t.dim() == 1), name, " has the wrong rank: ",
              t.sizes());
  if (rows >= 0) TORCH_CHECK(t.size(0) == rows, name, " must have ", rows, " rows, got ",
                             t.sizes());
  if (cols >= 0) TORCH_CHECK(t.dim() == 2 && t.size(1) == cols, name, " must have ", cols,
                             " columns, got ", t.sizes());
}

void check_problem(const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq,
                   const at::Tensor& tk, double s_scale, double t_scale, int64_t block_rows) {
  check_matrix("sq", sq, sq, -1, -1);
  const int64_t n = sq.size(0), m = sk.size(0);
  check_matrix("sk", sk, sq, -1, sq.size(1));
  check_matrix("tq", tq, sq, n, -1);
  check_matrix("tk", tk, sq, m, tq.size(1));
  TORCH_CHECK(std::isfinite(s_scale) && std::isfinite(t_scale), "s_scale and t_scale must be "
              "finite, got ", s_scale, ", ", t_scale);
  TORCH_CHECK(block_rows >= 0, "block_rows must be >= 0 (0 = automatic), got ", block_rows);
}

}  // namespace

void register_distill_ops(pybind11::module_& m) {
  namespace py = pybind11;
  using kernel_call = kernel_call_guard;
  m.def(
      "distill_forward",
      [](const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq, const at::Tensor& tk,
         double s_scale, double t_scale, bool with_cols, int64_t block_rows) {
        check_problem(sq, sk, tq, tk, s_scale, t_scale, block_rows);
        const at::NoGradGuard no_grad;
        auto out = distill_forward(sq, sk, tq, tk, s_scale, t_scale, with_cols, std::nullopt,
                                   std::nullopt, false, false, block_rows);
        return std::make_tuple(std::get<0>(out), std::get<1>(out));
      },
      kernel_call(),
      "(row stats (3, N): lse^S, lse^T, sum_j p^T_ij s_ij; col stats (3, M) or None)",
      py::arg("sq"), py::arg("sk"), py::arg("tq"), py::arg("tk"), py::arg("s_scale"),
      py::arg("t_scale"), py::kw_only(), py::arg("with_cols") = false,
      py::arg("block_rows") = 0);
  m.def(
      "distill_forward_with_grad",
      [](const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq, const at::Tensor& tk,
         double s_scale, double t_scale, const at::Tensor& row_grad,
         const OptTensor& row_student_grad, bool need_gq, bool need_gk, int64_t block_rows) {
        check_problem(sq, sk, tq, tk, s_scale, t_scale, block_rows);
        check_matrix("row_grad", row_grad, sq, sq.size(0), -1);
        if (row_student_grad) {
          check_matrix("row_student_grad", *row_student_grad, sq, sq.size(0), -1);
        }
        const at::NoGradGuard no_grad;
        auto out = distill_forward(sq, sk, tq, tk, s_scale, t_scale, false, row_grad,
                                   row_student_grad, need_gq, need_gk, block_rows);
        return std::make_tuple(std::get<0>(out), std::get<2>(out), std::get<3>(out));
      },
      kernel_call(),
      "(row stats (3, N), gq or None, gk or None) of the row direction in one pass over the "
      "tiles, no recompute; row_student_grad: the weights of P^S (None: row_grad)",
      py::arg("sq"), py::arg("sk"), py::arg("tq"), py::arg("tk"), py::arg("s_scale"),
      py::arg("t_scale"), py::arg("row_grad"), py::kw_only(),
      py::arg("row_student_grad") = py::none(), py::arg("need_gq") = true,
      py::arg("need_gk") = true, py::arg("block_rows") = 0);
  m.def(
      "distill_backward",
      [](const at::Tensor& sq, const at::Tensor& sk, const at::Tensor& tq, const at::Tensor& tk,
         double s_scale, double t_scale, const at::Tensor& row_stats, const at::Tensor& row_grad,
         const OptTensor& col_stats, const OptTensor& col_grad,
         const OptTensor& row_student_grad, const OptTensor& col_student_grad, bool need_gq,
         bool need_gk, int64_t block_rows) {
        check_problem(sq, sk, tq, tk, s_scale, t_scale, block_rows);
        const int64_t n = sq.size(0), m = sk.size(0);
        check_matrix("row_stats", row_stats, sq, 3, n);
        check_matrix("row_grad", row_grad, sq, n, -1);
        TORCH_CHECK(col_stats.has_value() == col_grad.has_value(),
                    "col_stats and col_grad must be given together");
        if (col_stats) {
          check_matrix("col_stats", *col_stats, sq, 3, m);
          check_matrix("col_grad", *col_grad, sq, m, -1);
        }
        if (row_student_grad) {
          check_matrix("row_student_grad", *row_student_grad, sq, n, -1);
        }
        TORCH_CHECK(!col_student_grad || col_stats, "col_student_grad needs col_stats");
        if (col_student_grad) {
          check_matrix("col_student_grad", *col_student_grad, sq, m, -1);
        }
        const at::NoGradGuard no_grad;
        return distill_backward(sq, sk, tq, tk, s_scale, t_scale, row_stats, row_grad,
                                col_stats, col_grad, row_student_grad, col_student_grad,
                                need_gq, need_gk, block_rows);
      },
      kernel_call(),
      "(gq or None, gk or None): sums of G_ij = a_i P^S_ij - g_i P^T_ij + (column term) over "
      "the student keys / queries, a = row_student_grad (None: row_grad), likewise the "
      "columns; recomputes both tiles",
      py::arg("sq"), py::arg("sk"), py::arg("tq"), py::arg("tk"), py::arg("s_scale"),
      py::arg("t_scale"), py::arg("row_stats"), py::arg("row_grad"),
      py::arg("col_stats") = py::none(), py::arg("col_grad") = py::none(), py::kw_only(),
      py::arg("row_student_grad") = py::none(), py::arg("col_student_grad") = py::none(),
      py::arg("need_gq") = true, py::arg("need_gk") = true, py::arg("block_rows") = 0);
}

}  // namespace fastcontrast
