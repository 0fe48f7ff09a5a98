// SigLIP's pairwise sigmoid loss on CPU (see siglip.h for the maths and the contract).
//
// Images are processed in blocks of R rows (r0 .. r0 + R). Per block, one score tile:
//   1. tile = x[r0:r0+R] @ y^T                  (R x M, one ATen GEMM, MKL-threaded)
//   2. one fused elementwise pass, rows split across threads, each row a vectorised loop over
//      the M texts: z = scale * tile + bias, the row's sum of softplus(-y_ij z_ij) and/or the
//      gradient weight dz_ij written back over the tile (and the row's sum of dz for d bias)
//   3. gradient GEMMs on the weights: gx[r0:r0+R] = tile @ y,  gy += tile^T @ x[r0:r0+R]
// The diagonal entry of a row (the matching text, label +1) is handled apart from the loop, so
// that no loop tests a label per element. Everything accumulates in the input dtype (the host
// upcasts float16 / bfloat16 to float32).
//
// Numerics: softplus(t) = max(t, 0) + log1p(exp(-|t|)) and sigmoid(t) from the same exp(-|t|),
// finite for any |z| (exp underflows to 0 beyond |z| ~ 87 in float32), with a vectorisable
// log1p that keeps full relative precision for the tiny terms (t << 0) that dominate the sums.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <optional>

#include "cpu/fast_exp.h"
#include "cpu/outputs.h"
#include "cpu/host_threads.h"
#include "cpu/siglip.h"
#include "register_ops.h"

namespace fastcontrast {
namespace {

using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kTileBytes = int64_t(16) << 20;  // one R x M score tile
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kMaxBlockRows = 1024;
constexpr int64_t kElemsPerTask = 16384;  // parallel grain of the elementwise pass

// Horner coefficients 1 / (2k + 1) of the atanh series, highest first, enough terms for each
// type's precision: |s| <= 0.172 below, so s^2 <= 0.0295 and the first dropped term is
// 0.0295^6 / 13 ~ 5e-11 (float, k <= 5) or 0.0295^10 / 21 ~ 2e-17 (double, k <= 9).
template <typename T>
struct Atanh;
template <>
struct Atanh<float> {
  static constexpr int kTerms = 6;
  static constexpr float c[kTerms] = {1.f / 11, 1.f / 9, 1.f / 7, 1.f / 5, 1.f / 3, 1.f};
};
template <>
struct Atanh<double> {
  static constexpr int kTerms = 10;
  static constexpr double c[kTerms] = {1. / 19, 1. / 17, 1. / 15, 1. / 13, 1. / 11,
                                       1. / 9,  1. / 7,  1. / 5,  1. / 3,  1.};
};

// log1p(e) for e in [0, 1], branch-free (vectorises), full relative precision as e -> 0:
//   1 + e = 2^k (1 + f) with k = 0, f = e (e <= sqrt2 - 1) or k = 1, f = (e - 1) / 2,
//   log1p(f) = 2 atanh(s) = 2 s (1 + s^2/3 + s^4/5 + ...), s = f / (2 + f), |s| <= 0.172.
template <typename T>
FASTCONTRAST_ALWAYS_INLINE T log1p_unit(T e) {
  const bool upper = e > T(0.41421356237309503);
  const T f = upper ? (e - T(1)) * T(0.5) : e;
  const T k_ln2 = upper ? T(0.69314718055994531) : T(0);
  const T s = f / (T(2) + f);
  const T s2 = s * s;
  T p = Atanh<T>::c[0];
  for (int i = 1; i < Atanh<T>::kTerms; ++i) p = p * s2 + Atanh<T>::c[i];
  return k_ln2 + T(2) * s * p;
}

// softplus(t) = log(1 + exp(t)) and sigmoid(t) = 1 / (1 + exp(-t)), both from e = exp(-|t|).
template <typename T>
FASTCONTRAST_ALWAYS_INLINE T softplus(T t, T e) {
  return (t > T(0) ? t : T(0)) + log1p_unit(e);
}
template <typename T>
FASTCONTRAST_ALWAYS_INLINE T sigmoid(T t, T e) {
  const T r = T(1) / (T(1) + e);
  return t >= T(0) ? r : e * r;
}

// Off-diagonal entries j0 .. j1 of one tile row (label -1, so t = z): adds softplus(z) to
// loss_sum (kLoss) and writes dz = g sigmoid(z) over the raw dots, adding it to dz_sum (kGrad).
template <typename T, bool kLoss, bool kGrad>
FASTCONTRAST_ALWAYS_INLINE void negatives(T* dots, int64_t j0, int64_t j1, T scale, T bias, T g,
                                          T& loss_sum, T& dz_sum) {
  T ls = 0, ds = 0;
#pragma omp simd reduction(+ : ls, ds)
  for (int64_t j = j0; j < j1; ++j) {
    const T z = dots[j] * scale + bias;
    const T e = fast_exp(-std::abs(z));
    if (kLoss) ls += softplus(z, e);
    if (kGrad) {
      const T dz = g * sigmoid(z, e);
      dots[j] = dz;
      ds += dz;
    }
  }
  loss_sum += ls;
  dz_sum += ds;
}

// The positive pair (label +1, t = -z): softplus(-z), and dz = -g sigmoid(-z) over the dot.
template <typename T, bool kLoss, bool kGrad>
void positive(T* dot, T scale, T bias, T g, T& loss_sum, T& dz_sum) {
  const T t = -(*dot * scale + bias);
  const T e = fast_exp(-std::abs(t));
  if (kLoss) loss_sum += softplus(t, e);
  if (kGrad) {
    const T dz = -g * sigmoid(t, e);
    *dot = dz;
    dz_sum += dz;
  }
}

// R: the tile budget over one row of the tile, a multiple of 16 in [16, 1024], at most N.
int64_t choose_block_rows(int64_t n, int64_t m, int64_t elem_size, int64_t requested) {
  int64_t r = requested;
  if (r <= 0) {
    r = kTileBytes / std::max<int64_t>(m * elem_size, 1);
    r = std::clamp<int64_t>(r / 16 * 16, kMinBlockRows, kMaxBlockRows);
  }
  return std::max<int64_t>(1, std::min(r, n));
}

template <typename T, bool kLoss, bool kGrad>
std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> tiles_impl(
    const at::Tensor& x, const at::Tensor& y, T scale, T bias, const OptTensor& row_grad,
    bool need_gx, bool need_gy, int64_t requested_rows) {
  const int64_t n = x.size(0), m = y.size(0), d = x.size(1);
  const int64_t block_rows = choose_block_rows(n, m, sizeof(T), requested_rows);
  OptTensor loss, gx, gy, dz_total;
  if (kLoss) loss = new_output({n}, x.options());
  at::Tensor dz_rows = new_output({kGrad ? n : 0}, x.options());  // summed into dz_total
  if (kGrad && need_gx) gx = new_output({n, d}, x.options());
  if (kGrad && need_gy) gy = at::zeros({m, d}, x.options());  // accumulated
  T* loss_out = kLoss ? loss->data_ptr<T>() : nullptr;
  T* dz_out = dz_rows.data_ptr<T>();
  const T* g_in = kGrad ? row_grad->data_ptr<T>() : nullptr;

  at::Tensor buffer = at::empty({block_rows * m}, x.options());
  const int64_t grain = std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(m, 1));
  for (int64_t r0 = 0; r0 < n; r0 += block_rows) {
    const int64_t rows = std::min(block_rows, n - r0);
    at::Tensor tile = buffer.narrow(0, 0, rows * m).view({rows, m});
    const at::Tensor x_block = x.narrow(0, r0, rows);
    at::mm_out(tile, x_block, y.t());
    T* base = tile.data_ptr<T>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = r0 + i;
        T* dots = base + i * m;  // int64: R * M passes 2^31 for M above 2M texts
        const T g = kGrad ? g_in[row] : T(0);
        const int64_t cut = std::min(row, m);  // the positive's column, m if there is none
        T loss_sum = 0, dz_sum = 0;
        negatives<T, kLoss, kGrad>(dots, 0, cut, scale, bias, g, loss_sum, dz_sum);
        if (cut < m) positive<T, kLoss, kGrad>(dots + cut, scale, bias, g, loss_sum, dz_sum);
        negatives<T, kLoss, kGrad>(dots, std::min(cut + 1, m), m, scale, bias, g, loss_sum,
                                   dz_sum);
        if (kLoss) loss_out[row] = loss_sum;
        if (kGrad) dz_out[row] = dz_sum;
      }
    });
    if (gx) {
      at::Tensor gx_block = gx->narrow(0, r0, rows);
      at::mm_out(gx_block, tile, y);
    }
    if (gy) gy->addmm_(tile.t(), x_block);
  }
  if (kGrad) dz_total = dz_rows.sum();
  return {loss, gx, gy, dz_total};
}

// Argument checks of the entry points: each names the argument, the expected and the actual value.
void check_inputs(const at::Tensor& x, const at::Tensor& y, double scale, double bias,
                  const OptTensor& row_grad, int64_t block_rows) {
  TORCH_CHECK(x.device().is_cpu(), "x must be a CPU tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (N, D), got shape ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "x must have dtype float32 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous, got strides ", x.strides());
  TORCH_CHECK(y.device().is_cpu(), "y must be a CPU tensor, got device ", y.device());
  TORCH_CHECK(y.dim() == 2 && y.size(1) == x.size(1), "y must have shape (M, D) with D = ",
              x.size(1), " (the feature dim of x), got ", y.sizes());
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "y must have dtype ", x.scalar_type(),
              " (the dtype of x), got ", y.scalar_type());
  TORCH_CHECK(y.is_contiguous(), "y must be contiguous, got strides ", y.strides());
  TORCH_CHECK(std::isfinite(scale), "scale must be finite, got ", scale);
  TORCH_CHECK(std::isfinite(bias), "bias must be finite, got ", bias);
  TORCH_CHECK(block_rows >= 0, "block_rows must be >= 0 (0 = automatic), got ", block_rows);
  if (row_grad) {
    const at::Tensor& g = *row_grad;
    TORCH_CHECK(g.device().is_cpu(), "row_grad must be a CPU tensor, got device ", g.device());
    TORCH_CHECK(g.dim() == 1 && g.size(0) == x.size(0), "row_grad must have shape (",
                x.size(0), ",) (one per row of x), got ", g.sizes());
    TORCH_CHECK(g.scalar_type() == x.scalar_type(), "row_grad must have dtype ",
                x.scalar_type(), " (the dtype of x), got ", g.scalar_type());
    TORCH_CHECK(g.is_contiguous(), "row_grad must be contiguous, got strides ", g.strides());
  }
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> checked_tiles(
    const at::Tensor& x, const at::Tensor& y, double scale, double bias, bool with_loss,
    const OptTensor& row_grad, bool need_gx, bool need_gy, int64_t block_rows) {
  check_inputs(x, y, scale, bias, row_grad, block_rows);
  const at::NoGradGuard no_grad;  // out= GEMMs on inputs that may require grad
  return siglip_tiles(x, y, scale, bias, with_loss, row_grad, need_gx, need_gy, block_rows);
}

}  // namespace

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor> siglip_tiles(
    const at::Tensor& x, const at::Tensor& y, double scale, double bias, bool with_loss,
    const OptTensor& row_grad, bool need_gx, bool need_gy, int64_t block_rows) {
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "siglip_tiles", [&] {
    using T = scalar_t;
    const T s = static_cast<T>(scale), b = static_cast<T>(bias);
    if (with_loss && row_grad)
      return tiles_impl<T, true, true>(x, y, s, b, row_grad, need_gx, need_gy, block_rows);
    if (row_grad)
      return tiles_impl<T, false, true>(x, y, s, b, row_grad, need_gx, need_gy, block_rows);
    return tiles_impl<T, true, false>(x, y, s, b, row_grad, false, false, block_rows);
  });
}

// The gradient entry points: (gx, gy, dz_total), preceded by the loss when kWithLoss.
template <bool kWithLoss>
auto gradient_entry(const at::Tensor& x, const at::Tensor& y, double scale, double bias,
                    const at::Tensor& row_grad, bool need_gx, bool need_gy, int64_t block_rows) {
  auto [loss, gx, gy, dz_total] =
      checked_tiles(x, y, scale, bias, kWithLoss, row_grad, need_gx, need_gy, block_rows);
  if constexpr (kWithLoss) {
    return std::make_tuple(*loss, gx, gy, *dz_total);
  } else {
    return std::make_tuple(gx, gy, *dz_total);
  }
}

void register_siglip_ops(pybind11::module_& m) {
  namespace py = pybind11;
  using kernel_call = kernel_call_guard;
  m.def(
      "siglip_forward",
      [](const at::Tensor& x, const at::Tensor& y, double scale, double bias, int64_t block_rows) {
        return *std::get<0>(checked_tiles(x, y, scale, bias, true, std::nullopt, false, false,
                                          block_rows));
      },
      kernel_call(),
      "loss_i = sum_j softplus(-y_ij z_ij), z_ij = scale <x_i, y_j> + bias, y_ij = +1 iff i == j",
      py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("bias"), py::kw_only(),
      py::arg("block_rows") = 0);
  const auto def_gradient = [&](const char* name, auto fn, const char* doc) {
    m.def(name, fn, kernel_call(), doc, py::arg("x"), py::arg("y"), py::arg("scale"),
          py::arg("bias"), py::arg("row_grad"), py::kw_only(), py::arg("need_gx") = true,
          py::arg("need_gy") = true, py::arg("block_rows") = 0);
  };
  def_gradient("siglip_backward", &gradient_entry<false>,
               "(gx or None, gy or None, dz_total) for dz_ij = -row_grad_i y_ij sigmoid(-y_ij "
               "z_ij): gx_i = sum_j dz_ij y_j, gy_j = sum_i dz_ij x_i; recomputes the tiles");
  def_gradient("siglip_forward_with_grad", &gradient_entry<true>,
               "(loss, gx or None, gy or None, dz_total) in one pass, no recompute");
}

}  // namespace fastcontrast
