// Multi-tensor momentum (EMA) update on CPU: every (target, online) pair of a call in ONE
// parallel region.
//
//   target <- lerp(target, online, w) = m * target + (1 - m) * online,   w = 1 - m
//
// computed in float (double for double targets) with torch.lerp's two-sided formula, exact at both
// ends (w = 0 keeps the target, w = 1 gives the online value bit for bit):
//   w < 0.5:  x + w * (y - x)          else:  y - (y - x) * (1 - w)
//
// The tensors are laid end to end in one virtual element range [0, total); at::parallel_for hands
// each thread one contiguous slice of it, and the thread walks the tensors its slice overlaps.
// So a ResNet-50 (161 tensors, 25.6M elements) costs one fork/join instead of 161, small tensors
// (BatchNorm's 64-element vectors) do not each pay a parallel-region overhead, and the work is
// balanced by elements, not by tensors. Each tensor's slice is a plain loop over contiguous memory
// that the compiler vectorises (-O3 -march=native).
//
// Supported (target, online) dtypes: equal dtypes (float32, float64, float16, bfloat16), or a
// float32 / float64 master target with a lower-precision online tensor.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "cpu/host_threads.h"
#include "register_ops.h"

namespace fastcontrast {
namespace {

constexpr int64_t kGrain = 1 << 16;  // below this many elements in all, one thread does it all

// One contiguous slice [begin, end) of target <- lerp(target, online, w), in compute type C.
template <typename T, typename O, typename C>
void lerp_slice(void* target, const void* online, int64_t begin, int64_t end, double weight) {
  T* __restrict__ x = static_cast<T*>(target);
  const O* __restrict__ y = static_cast<const O*>(online);
  const C w = static_cast<C>(weight);
  if (w < C(0.5)) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const C xi = static_cast<C>(x[i]);
      const C yi = static_cast<C>(y[i]);
      x[i] = static_cast<T>(xi + w * (yi - xi));
    }
  } else {
    const C v = C(1) - w;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const C xi = static_cast<C>(x[i]);
      const C yi = static_cast<C>(y[i]);
      x[i] = static_cast<T>(yi - (yi - xi) * v);
    }
  }
}

using SliceFn = void (*)(void*, const void*, int64_t, int64_t, double);

// The slice function of a (target, online) dtype pair, or nullptr when the pair is unsupported.
SliceFn slice_fn(at::ScalarType target, at::ScalarType online) {
  using at::BFloat16;
  using at::Half;
  switch (target) {
    case at::kFloat:
      switch (online) {
        case at::kFloat: return &lerp_slice<float, float, float>;
        case at::kHalf: return &lerp_slice<float, Half, float>;
        case at::kBFloat16: return &lerp_slice<float, BFloat16, float>;
        default: return nullptr;
      }
    case at::kDouble:
      switch (online) {
        case at::kDouble: return &lerp_slice<double, double, double>;
        case at::kFloat: return &lerp_slice<double, float, double>;
        case at::kHalf: return &lerp_slice<double, Half, double>;
        case at::kBFloat16: return &lerp_slice<double, BFloat16, double>;
        default: return nullptr;
      }
    case at::kHalf:
      return online == at::kHalf ? &lerp_slice<Half, Half, float> : nullptr;
    case at::kBFloat16:
      return online == at::kBFloat16 ? &lerp_slice<BFloat16, BFloat16, float> : nullptr;
    default:
      return nullptr;
  }
}

struct Pair {
  void* target;
  const void* online;
  int64_t numel;
  SliceFn fn;
};

// Checks every pair (CPU, same shape, dense with equal strides, supported dtypes) and returns
// the work list. Dense with equal strides (contiguous, channels_last, ...) means that the i-th
// element in memory of the target and of the online tensor are the same logical element.
std::vector<Pair> make_pairs(const std::vector<at::Tensor>& targets,
                             const std::vector<at::Tensor>& onlines) {
  TORCH_CHECK(targets.size() == onlines.size(),
              "targets and onlines must have the same length, got ",
              targets.size(), " and ", onlines.size());
  std::vector<Pair> pairs;
  pairs.reserve(targets.size());
  for (size_t i = 0; i < targets.size(); ++i) {
    const at::Tensor& target = targets[i];
    const at::Tensor& online = onlines[i];
    TORCH_CHECK(target.device().is_cpu() && online.device().is_cpu(), "pair ", i,
                ": target and online must be CPU tensors, got ", target.device(), " and ",
                online.device());
    TORCH_CHECK(online.sizes() == target.sizes(), "pair ", i,
                ": online must have the target's shape ", target.sizes(), ", got ",
                online.sizes());
    TORCH_CHECK(target.is_non_overlapping_and_dense() && online.strides() == target.strides(),
                "pair ", i, ": target must be dense and online must have its strides ",
                target.strides(), ", got target strides ", target.strides(),
                " and online strides ", online.strides());
    const SliceFn fn = slice_fn(target.scalar_type(), online.scalar_type());
    TORCH_CHECK(fn != nullptr, "pair ", i, ": unsupported (target, online) dtypes (",
                target.scalar_type(), ", ", online.scalar_type(),
                "); supported: equal floating dtypes, or a Float/Double target with a "
                "lower-precision online tensor");
    if (target.numel() > 0) {
      pairs.push_back({target.data_ptr(), online.const_data_ptr(), target.numel(), fn});
    }
  }
  return pairs;
}

void momentum_update(const std::vector<at::Tensor>& targets,
                     const std::vector<at::Tensor>& onlines, double weight) {
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, "weight (1 - momentum) must be in [0, 1], got ",
              weight);
  const std::vector<Pair> pairs = make_pairs(targets, onlines);
  // starts[k]: offset of pair k in the virtual element range; starts.back() = total.
  std::vector<int64_t> starts(pairs.size() + 1, 0);
  for (size_t k = 0; k < pairs.size(); ++k) starts[k + 1] = starts[k] + pairs[k].numel;
  const int64_t total = starts.back();
  if (total == 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // One contiguous slice per thread (at least kGrain elements each).
  const int64_t grain = std::max(kGrain, (total + threads - 1) / threads);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    // The first pair that overlaps [begin, end).
    size_t k = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) -
                                   starts.begin()) - 1;
    for (; k < pairs.size() && starts[k] < end; ++k) {
      const int64_t lo = std::max(begin, starts[k]) - starts[k];
      const int64_t hi = std::min(end, starts[k + 1]) - starts[k];
      pairs[k].fn(pairs[k].target, pairs[k].online, lo, hi, weight);
    }
  });
}

}  // namespace

void register_momentum_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("momentum_update_", &momentum_update, kernel_call_guard(),
        "targets[i] <- lerp(targets[i], onlines[i], weight) = (1 - weight) * targets[i] + "
        "weight * onlines[i] for all i, in one parallel region (weight = 1 - momentum)",
        py::arg("targets"), py::arg("onlines"), py::arg("weight"));
}

}  // namespace fastcontrast
