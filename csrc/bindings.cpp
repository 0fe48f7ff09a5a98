// Python bindings of the fastcontrast C++ CPU kernels: argument checks, then the kernels of
// cpu/infonce.cpp and cpu/gram.cpp. Every check names the argument, the expected and the actual
// value.
#include <torch/extension.h>

#include <optional>

#include "cpu/gram.h"
#include "cpu/host_threads.h"
#include "cpu/infonce.h"
#include "register_ops.h"

#define CHECK_CPU(x) \
  TORCH_CHECK((x).device().is_cpu(), #x " must be a CPU tensor, got device ", (x).device())
#define CHECK_CONTIGUOUS(x) \
  TORCH_CHECK((x).is_contiguous(), #x " must be contiguous, got strides ", (x).strides())
#define CHECK_DTYPE(x, dtype)                                                              \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype),              \
              " (the dtype of q), got ", (x).scalar_type())
#define CHECK_SHAPE(x, ...)                                                                \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape ",     \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())
#define CHECK_INPUT(x, dtype, ...) \
  CHECK_CPU(x);                    \
  CHECK_DTYPE(x, dtype);           \
  CHECK_SHAPE(x, __VA_ARGS__);     \
  CHECK_CONTIGUOUS(x)

// The optional false-negative filter arguments of the full-product entry points (add_filter).
#define FILTER_PARAMS                                                                    \
  const OptTensor &threshold, const OptTensor &positive_col, const OptTensor &guide_q,  \
      const OptTensor &guide_keys, const OptTensor &guide_threshold,                     \
      const OptTensor &col_threshold, const OptTensor &col_positive_row,                 \
      const OptTensor &col_guide_threshold
#define FILTER_ARGS                                                                   \
  threshold, positive_col, guide_q, guide_keys, guide_threshold, col_threshold,       \
      col_positive_row, col_guide_threshold
#define FILTER_PY_ARGS                                                                     \
  py::arg("threshold") = py::none(), py::arg("positive_col") = py::none(),               \
      py::arg("guide_q") = py::none(), py::arg("guide_keys") = py::none(),                \
      py::arg("guide_threshold") = py::none(), py::arg("col_threshold") = py::none(),    \
      py::arg("col_positive_row") = py::none(), py::arg("col_guide_threshold") = py::none()

namespace {

using OptTensor = std::optional<at::Tensor>;

// q (N, D) float32/float64, keys (M, D), alpha (N,), beta (M,), all CPU, contiguous, q's dtype.
void check_problem(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                   const at::Tensor& beta) {
  CHECK_CPU(q);
  TORCH_CHECK(q.dim() == 2, "q must be 2-D (N, D), got shape ", q.sizes());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "q must have dtype float32 or float64, got ", q.scalar_type());
  CHECK_CONTIGUOUS(q);
  const auto dtype = q.scalar_type();
  const int64_t n = q.size(0), d = q.size(1);
  CHECK_CPU(keys);
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == d, "keys must have shape (M, D) with D = ", d,
              " (the feature dim of q), got ", keys.sizes());
  CHECK_DTYPE(keys, dtype);
  CHECK_CONTIGUOUS(keys);
  const int64_t m = keys.size(0);
  CHECK_INPUT(alpha, dtype, n);
  CHECK_INPUT(beta, dtype, m);
}

// row_ids (N,) and col_ids (M,): int64 CPU contiguous, both or neither; packed with the diagonal
// mask into the kernels' Mask.
fastcontrast::Mask make_mask(bool exclude_diag, int64_t diag_offset, const OptTensor& row_ids,
                             const OptTensor& col_ids, int64_t n, int64_t m) {
  TORCH_CHECK(row_ids.has_value() == col_ids.has_value(),
              "row_ids and col_ids must be given together, got row_ids ",
              row_ids ? "a tensor" : "None", " and col_ids ", col_ids ? "a tensor" : "None");
  if (row_ids) {
    CHECK_INPUT(*row_ids, at::kLong, n);
    CHECK_INPUT(*col_ids, at::kLong, m);
  }
  return fastcontrast::Mask{exclude_diag, diag_offset, row_ids, col_ids};
}

// The column rule of the false-negative filter (cpu/row_filter.h), a symmetric pass: given with
// col_positive_row (M,) int64 and positive_col; col_threshold (M,) exactly where threshold is,
// col_guide_threshold (M,) exactly where the guide is.
void add_column_rule(fastcontrast::RowFilter& f, at::ScalarType dtype, int64_t m,
                     const OptTensor& col_threshold, const OptTensor& col_positive_row,
                     const OptTensor& col_guide_threshold) {
  if (!col_threshold && !col_positive_row && !col_guide_threshold) return;
  TORCH_CHECK(col_positive_row.has_value() && f.positive_col.has_value(),
              "the column rule needs col_positive_row and positive_col, got col_positive_row ",
              col_positive_row ? "a tensor" : "None", " and positive_col ",
              f.positive_col ? "a tensor" : "None");
  CHECK_INPUT(*col_positive_row, at::kLong, m);
  TORCH_CHECK(col_threshold.has_value() == f.threshold.has_value(),
              "col_threshold must be given exactly with threshold, got col_threshold ",
              col_threshold ? "a tensor" : "None", " and threshold ",
              f.threshold ? "a tensor" : "None");
  TORCH_CHECK(col_guide_threshold.has_value() == f.guide_q.has_value(),
              "col_guide_threshold must be given exactly with the guide, got col_guide_threshold ",
              col_guide_threshold ? "a tensor" : "None", " and guide_q ",
              f.guide_q ? "a tensor" : "None");
  TORCH_CHECK(f.threshold || f.guide_q, "the column rule needs a threshold or a guide");
  if (col_threshold) {
    CHECK_INPUT(*col_threshold, dtype, m);
  }
  if (col_guide_threshold) {
    CHECK_INPUT(*col_guide_threshold, dtype, m);
  }
  f.col_threshold = col_threshold;
  f.col_positive_row = col_positive_row;
  f.col_guide_threshold = col_guide_threshold;
}

// The false-negative filter (cpu/row_filter.h): threshold (N,), positive_col (N,) int64,
// guide_q (N, G) / guide_keys (M, G) / guide_threshold (N,), each optional, the guide's three
// together; q's dtype, CPU, contiguous. Set on the mask when any is given.
void add_filter(fastcontrast::Mask& mask, const at::Tensor& q, int64_t m, const OptTensor& threshold,
                const OptTensor& positive_col, const OptTensor& guide_q,
                const OptTensor& guide_keys, const OptTensor& guide_threshold,
                const OptTensor& col_threshold, const OptTensor& col_positive_row,
                const OptTensor& col_guide_threshold) {
  if (!threshold && !positive_col && !guide_q && !guide_keys && !guide_threshold &&
      !col_threshold && !col_positive_row && !col_guide_threshold)
    return;
  const auto dtype = q.scalar_type();
  const int64_t n = q.size(0);
  if (threshold) {
    CHECK_INPUT(*threshold, dtype, n);
  }
  if (positive_col) {
    CHECK_INPUT(*positive_col, at::kLong, n);
  }
  TORCH_CHECK(guide_q.has_value() == guide_keys.has_value() &&
                  guide_q.has_value() == guide_threshold.has_value(),
              "guide_q, guide_keys and guide_threshold must be given together, got guide_q ",
              guide_q ? "a tensor" : "None", ", guide_keys ", guide_keys ? "a tensor" : "None",
              ", guide_threshold ", guide_threshold ? "a tensor" : "None");
  if (guide_q) {
    const int64_t g = guide_q->dim() == 2 ? guide_q->size(1) : -1;
    CHECK_INPUT(*guide_q, dtype, n, g);
    CHECK_INPUT(*guide_keys, dtype, m, g);
    CHECK_INPUT(*guide_threshold, dtype, n);
  }
  fastcontrast::RowFilter filter;
  filter.threshold = threshold;
  filter.positive_col = positive_col;
  filter.guide_q = guide_q;
  filter.guide_keys = guide_keys;
  filter.guide_threshold = guide_threshold;
  add_column_rule(filter, dtype, m, col_threshold, col_positive_row, col_guide_threshold);
  mask.filter = filter;
}

std::tuple<at::Tensor, OptTensor> forward(const at::Tensor& q, const at::Tensor& keys,
                                          const at::Tensor& alpha, const at::Tensor& beta,
                                          bool exclude_diag, int64_t diag_offset,
                                          const OptTensor& row_ids, const OptTensor& col_ids,
                                          bool with_col_lse, int64_t block_rows, FILTER_PARAMS) {
  check_problem(q, keys, alpha, beta);
  auto mask = make_mask(exclude_diag, diag_offset, row_ids, col_ids, q.size(0), keys.size(0));
  add_filter(mask, q, keys.size(0), FILTER_ARGS);
  const at::NoGradGuard no_grad;  // out= GEMMs on inputs that require grad
  return fastcontrast::masked_lse_forward(q, keys, alpha, beta, mask, with_col_lse, block_rows);
}

std::tuple<OptTensor, OptTensor> backward(const at::Tensor& q, const at::Tensor& keys,
                                          const at::Tensor& alpha, const at::Tensor& beta,
                                          const at::Tensor& row_lse, const at::Tensor& row_grad,
                                          const OptTensor& col_lse_opt,
                                          const OptTensor& col_grad_opt, bool exclude_diag,
                                          int64_t diag_offset, const OptTensor& row_ids,
                                          const OptTensor& col_ids, bool need_dq, bool need_dkeys,
                                          int64_t block_rows, FILTER_PARAMS) {
  check_problem(q, keys, alpha, beta);
  const auto dtype = q.scalar_type();
  const int64_t n = q.size(0), m = keys.size(0);
  CHECK_INPUT(row_lse, dtype, n);
  CHECK_INPUT(row_grad, dtype, n);
  TORCH_CHECK(col_lse_opt.has_value() == col_grad_opt.has_value(),
              "col_lse and col_grad must be given together, got col_lse ",
              col_lse_opt ? "a tensor" : "None", " and col_grad ",
              col_grad_opt ? "a tensor" : "None");
  if (col_lse_opt) {
    const at::Tensor& col_lse = *col_lse_opt;
    const at::Tensor& col_grad = *col_grad_opt;
    CHECK_INPUT(col_lse, dtype, m);
    CHECK_INPUT(col_grad, dtype, m);
  }
  auto mask = make_mask(exclude_diag, diag_offset, row_ids, col_ids, n, m);
  add_filter(mask, q, m, FILTER_ARGS);
  const at::NoGradGuard no_grad;
  return fastcontrast::masked_lse_backward(q, keys, alpha, beta, row_lse, row_grad, col_lse_opt,
                                           col_grad_opt, mask, need_dq, need_dkeys, block_rows);
}

std::tuple<at::Tensor, OptTensor, OptTensor> forward_with_grad(
    const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha, const at::Tensor& beta,
    const at::Tensor& row_grad, bool exclude_diag, int64_t diag_offset, const OptTensor& row_ids,
    const OptTensor& col_ids, const OptTensor& extra_lse_opt, bool need_dq, bool need_dkeys,
    int64_t block_rows, FILTER_PARAMS) {
  check_problem(q, keys, alpha, beta);
  const auto dtype = q.scalar_type();
  const int64_t n = q.size(0);
  CHECK_INPUT(row_grad, dtype, n);
  if (extra_lse_opt) {
    const at::Tensor& extra_lse = *extra_lse_opt;
    CHECK_INPUT(extra_lse, dtype, n);
  }
  TORCH_CHECK(!col_positive_row, "masked_lse_forward_with_grad has no column term: the column "
              "rule of the filter goes to masked_lse_forward / masked_lse_backward");
  auto mask = make_mask(exclude_diag, diag_offset, row_ids, col_ids, n, keys.size(0));
  add_filter(mask, q, keys.size(0), FILTER_ARGS);
  const at::NoGradGuard no_grad;
  return fastcontrast::masked_lse_forward_with_grad(q, keys, alpha, beta, row_grad, mask,
                                                    extra_lse_opt, need_dq, need_dkeys,
                                                    block_rows);
}

// The dropped-candidate counts of the filter (int64 (N,)), the forward's tiles without exps.
at::Tensor dropped(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                   const at::Tensor& beta, bool exclude_diag, int64_t diag_offset,
                   const OptTensor& row_ids, const OptTensor& col_ids, int64_t block_rows,
                   FILTER_PARAMS) {
  check_problem(q, keys, alpha, beta);
  auto mask = make_mask(exclude_diag, diag_offset, row_ids, col_ids, q.size(0), keys.size(0));
  add_filter(mask, q, keys.size(0), FILTER_ARGS);
  const at::NoGradGuard no_grad;
  return fastcontrast::masked_lse_dropped(q, keys, alpha, beta, mask, block_rows);
}

// The symmetric-Gram kernels: z (N, D) in both roles, alpha / beta / ids of length N.
at::Tensor gram_forward(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                        bool exclude_diag, const OptTensor& row_ids, const OptTensor& col_ids,
                        int64_t block_rows) {
  check_problem(z, z, alpha, beta);
  const auto mask = make_mask(exclude_diag, 0, row_ids, col_ids, z.size(0), z.size(0));
  const at::NoGradGuard no_grad;
  return fastcontrast::gram_lse_forward(z, alpha, beta, mask, block_rows);
}

at::Tensor gram_backward(const at::Tensor& z, const at::Tensor& alpha, const at::Tensor& beta,
                         const at::Tensor& row_lse, const at::Tensor& row_grad, bool exclude_diag,
                         const OptTensor& row_ids, const OptTensor& col_ids,
                         int64_t block_rows) {
  check_problem(z, z, alpha, beta);
  const auto dtype = z.scalar_type();
  const int64_t n = z.size(0);
  CHECK_INPUT(row_lse, dtype, n);
  CHECK_INPUT(row_grad, dtype, n);
  const auto mask = make_mask(exclude_diag, 0, row_ids, col_ids, n, n);
  const at::NoGradGuard no_grad;
  return fastcontrast::gram_lse_backward(z, alpha, beta, row_lse, row_grad, mask, block_rows);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using kernel_call = fastcontrast::kernel_call_guard;
  m.doc() = "fastcontrast C++ CPU kernels: fused masked log-sum-exp and its gradient";
  m.def("masked_lse_forward", &forward, kernel_call(),
        "(row_lse, col_lse or None) of s_ij = alpha_i beta_j <q_i, keys_j>", py::arg("q"),
        py::arg("keys"), py::arg("alpha"), py::arg("beta"), py::kw_only(),
        py::arg("exclude_diag") = false, py::arg("diag_offset") = 0,
        py::arg("row_ids") = py::none(), py::arg("col_ids") = py::none(),
        py::arg("with_col_lse") = false, py::arg("block_rows") = 0, FILTER_PY_ARGS);
  m.def("masked_lse_backward", &backward, kernel_call(),
        "(dq or None, dkeys or None), recomputing the score tiles", py::arg("q"), py::arg("keys"),
        py::arg("alpha"), py::arg("beta"), py::arg("row_lse"), py::arg("row_grad"),
        py::arg("col_lse") = py::none(), py::arg("col_grad") = py::none(), py::kw_only(),
        py::arg("exclude_diag") = false, py::arg("diag_offset") = 0,
        py::arg("row_ids") = py::none(), py::arg("col_ids") = py::none(), py::arg("need_dq") = true,
        py::arg("need_dkeys") = true, py::arg("block_rows") = 0, FILTER_PY_ARGS);
  m.def("masked_lse_forward_with_grad", &forward_with_grad, kernel_call(),
        "(row_lse, dq or None, dkeys or None) in one pass, no recompute", py::arg("q"),
        py::arg("keys"), py::arg("alpha"), py::arg("beta"), py::arg("row_grad"), py::kw_only(),
        py::arg("exclude_diag") = false, py::arg("diag_offset") = 0,
        py::arg("row_ids") = py::none(), py::arg("col_ids") = py::none(),
        py::arg("extra_lse") = py::none(), py::arg("need_dq") = true,
        py::arg("need_dkeys") = true, py::arg("block_rows") = 0, FILTER_PY_ARGS);
  m.def("masked_lse_dropped", &dropped, kernel_call(),
        "int64 (N,): candidates of each query that the false-negative filter drops", py::arg("q"),
        py::arg("keys"), py::arg("alpha"), py::arg("beta"), py::kw_only(),
        py::arg("exclude_diag") = false, py::arg("diag_offset") = 0,
        py::arg("row_ids") = py::none(), py::arg("col_ids") = py::none(),
        py::arg("block_rows") = 0, FILTER_PY_ARGS);
  m.def("gram_lse_forward", &gram_forward, kernel_call(),
        "row_lse of s_ij = alpha_i beta_j <z_i, z_j> (symmetric), tiles on and above the diagonal",
        py::arg("z"), py::arg("alpha"), py::arg("beta"), py::kw_only(),
        py::arg("exclude_diag") = false, py::arg("row_ids") = py::none(),
        py::arg("col_ids") = py::none(), py::arg("block_rows") = 0);
  m.def("gram_lse_backward", &gram_backward, kernel_call(),
        "dz of the symmetric-Gram log-sum-exp, each tile used for both its rows and columns",
        py::arg("z"), py::arg("alpha"), py::arg("beta"), py::arg("row_lse"), py::arg("row_grad"),
        py::kw_only(), py::arg("exclude_diag") = false, py::arg("row_ids") = py::none(),
        py::arg("col_ids") = py::none(), py::arg("block_rows") = 0);
  m.def("masked_lse_fused_plan", [](int64_t n, int64_t m_keys, int64_t d, int64_t elem_size) {
          const auto plan = fastcontrast::masked_lse_fused_plan(n, m_keys, d, elem_size);
          return std::make_tuple(plan.block_rows, plan.slots, plan.tile_bytes, plan.tile_budget);
        },
        "(block_rows, slots, tile bytes in flight, one tile's budget) of "
        "masked_lse_forward_with_grad with gradients on the current thread count",
        kernel_call(),
        py::arg("n"), py::arg("m"), py::arg("d"), py::arg("elem_size") = 4);
  fastcontrast::register_siglip_ops(m);
  fastcontrast::register_momentum_ops(m);
  fastcontrast::register_distill_ops(m);
  fastcontrast::register_task_ops(m);
  fastcontrast::register_runtime_options(m);
  fastcontrast::register_host_thread_ops(m);
  fastcontrast::register_matryoshka_ops(m);
}
