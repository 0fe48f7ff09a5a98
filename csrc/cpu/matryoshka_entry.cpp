// The Python entry points of the Matryoshka log-sum-exps on CPU (matryoshka.h): argument checks,
// no grad mode, registration.
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cpu/host_threads.h"
#include "cpu/matryoshka.h"
#include "register_ops.h"

namespace fastcontrast {
namespace {

using OptTensor = std::optional<at::Tensor>;

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                  at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, " (the dtype of q), got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous, got strides ", t.strides());
}

// q (N, D) float32/float64, keys (M, D), alpha (P, N), beta (P, M), bounds 0 = b_0 < ... < b_P
// <= D: the checks of every entry point.
void check_problem(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                   const at::Tensor& beta, const std::vector<int64_t>& bounds) {
  TORCH_CHECK(q.dim() == 2, "q must be 2-D (N, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "q must have dtype float32 or float64, got ", q.scalar_type());
  const auto dtype = q.scalar_type();
  const int64_t n = q.size(0), d = q.size(1);
  check_tensor(q, "q", dtype, {n, d});
  TORCH_CHECK(keys.dim() == 2, "keys must be 2-D (M, D), got shape ", keys.sizes());
  const int64_t m = keys.size(0);
  check_tensor(keys, "keys", dtype, {m, d});
  TORCH_CHECK(bounds.size() >= 2 && bounds[0] == 0, "bounds must be 0 followed by the prefix "
              "dims, got ", at::IntArrayRef(bounds));
  for (size_t c = 1; c < bounds.size(); ++c)
    TORCH_CHECK(bounds[c] > bounds[c - 1] && bounds[c] <= d, "bounds must increase strictly up "
                "to at most D = ", d, ", got ", at::IntArrayRef(bounds));
  const int64_t count = static_cast<int64_t>(bounds.size()) - 1;
  check_tensor(alpha, "alpha", dtype, {count, n});
  check_tensor(beta, "beta", dtype, {count, m});
}

void check_diagonal(const at::Tensor& q, const at::Tensor& keys, bool exclude_diag) {
  TORCH_CHECK(!exclude_diag || keys.size(0) == q.size(0), "exclude_diag needs M == N, got N = ",
              q.size(0), ", M = ", keys.size(0));
}

std::tuple<at::Tensor, OptTensor> forward_entry(const at::Tensor& q, const at::Tensor& keys,
                                                const at::Tensor& alpha, const at::Tensor& beta,
                                                const std::vector<int64_t>& bounds,
                                                bool exclude_diag, bool with_col_lse,
                                                int64_t block_rows) {
  check_problem(q, keys, alpha, beta, bounds);
  check_diagonal(q, keys, exclude_diag);
  const at::NoGradGuard no_grad;  // out= GEMMs on inputs that require grad
  return matryoshka_lse_forward(q, keys, alpha, beta, bounds, exclude_diag, with_col_lse,
                                block_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_entry(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, const at::Tensor& row_lse, const at::Tensor& row_grad,
    const OptTensor& col_lse, const OptTensor& col_grad, bool exclude_diag, int64_t block_rows) {
  check_problem(q, keys, alpha, beta, bounds);
  check_tensor(row_lse, "row_lse", q.scalar_type(), alpha.sizes());
  TORCH_CHECK(col_lse.has_value() == col_grad.has_value(),
              "col_lse and col_grad must be given together");
  if (col_lse) {
    check_tensor(*col_lse, "col_lse", q.scalar_type(), beta.sizes());
    check_tensor(*col_grad, "col_grad", q.scalar_type(), beta.sizes());
  }
  const at::NoGradGuard no_grad;
  return matryoshka_lse_backward(q, keys, alpha, beta, bounds, row_lse, row_grad, col_lse,
                                 col_grad, exclude_diag, block_rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_with_grad_entry(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const std::vector<int64_t>& bounds, const at::Tensor& row_grad, bool exclude_diag,
    int64_t block_rows) {
  check_problem(q, keys, alpha, beta, bounds);
  check_tensor(row_grad, "row_grad", q.scalar_type(), alpha.sizes());
  check_diagonal(q, keys, exclude_diag);
  const at::NoGradGuard no_grad;
  return matryoshka_lse_forward_with_grad(q, keys, alpha, beta, bounds, row_grad, exclude_diag,
                                          block_rows);
}

}  // namespace

void register_matryoshka_ops(pybind11::module_& m) {
  namespace py = pybind11;
  using kernel_call = kernel_call_guard;
  m.def("matryoshka_lse_forward", &forward_entry, kernel_call(),
        "(row_lse (P, N), col_lse (P, M) or None) of every prefix of the product, one pass",
        py::arg("q"), py::arg("keys"), py::arg("alpha"), py::arg("beta"), py::arg("bounds"),
        py::kw_only(), py::arg("exclude_diag") = false, py::arg("with_col_lse") = false,
        py::arg("block_rows") = 0);
  m.def("matryoshka_lse_backward", &backward_entry, kernel_call(),
        "(dq, dkeys, dalpha, dbeta) of the prefix log-sum-exps, one product per chunk",
        py::arg("q"), py::arg("keys"), py::arg("alpha"), py::arg("beta"), py::arg("bounds"),
        py::arg("row_lse"), py::arg("row_grad"), py::arg("col_lse") = py::none(),
        py::arg("col_grad") = py::none(), py::kw_only(), py::arg("exclude_diag") = false,
        py::arg("block_rows") = 0);
  m.def("matryoshka_lse_forward_with_grad", &forward_with_grad_entry, kernel_call(),
        "(row_lse, dq, dkeys, dalpha, dbeta) in one pass over the tiles, no recompute",
        py::arg("q"), py::arg("keys"), py::arg("alpha"), py::arg("beta"), py::arg("bounds"),
        py::arg("row_grad"), py::kw_only(), py::arg("exclude_diag") = false,
        py::arg("block_rows") = 0);
}

}  // namespace fastcontrast
