// Python bindings of the fastcontrast CUDA kernels (momentum.cu, queue.cu): argument checks that
// name the argument, the expected and the actual value, a device guard, the current stream, and
// the raw-pointer launchers of launchers.h. Built only with a CUDA build of torch, just in time,
// by fastcontrast/_cuda_ext.py.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

#include "cuda/launchers.h"

namespace {

namespace fc = fastcontrast::cuda;
using OptTensor = std::optional<at::Tensor>;

fc::DType to_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return fc::DType::kFloat32;
    case at::kDouble: return fc::DType::kFloat64;
    case at::kHalf: return fc::DType::kFloat16;
    case at::kBFloat16: return fc::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must have dtype float32, float64, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return fc::DType::kFloat32;  // unreachable
}

void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "fastcontrast CUDA ", what, " failed: ", fc::error_string(code));
}

void momentum_update(const std::vector<at::Tensor>& targets,
                     const std::vector<at::Tensor>& onlines, double weight) {
  TORCH_CHECK(targets.size() == onlines.size(), "targets and onlines must have the same length, "
              "got ", targets.size(), " and ", onlines.size());
  TORCH_CHECK(weight >= 0.0 && weight <= 1.0, "weight (1 - momentum) must be in [0, 1], got ",
              weight);
  if (targets.empty()) return;
  const at::Tensor& t0 = targets[0];
  const at::Tensor& o0 = onlines[0];
  TORCH_CHECK(t0.is_cuda(), "targets[0] must be a CUDA tensor, got device ", t0.device());
  const fc::DType target_dtype = to_dtype(t0, "targets[0]");
  const fc::DType online_dtype = to_dtype(o0, "onlines[0]");
  TORCH_CHECK_TYPE(fc::lerp_pair_supported(target_dtype, online_dtype),
                   "unsupported (target, online) dtypes (", t0.scalar_type(), ", ",
                   o0.scalar_type(), "); supported: equal dtypes, or a Float/Double target with "
                   "a lower-precision online tensor");
  const int64_t n = static_cast<int64_t>(targets.size());
  // Host metadata, layout of launchers.h: addresses, numels, first blocks, then the block map.
  std::vector<int64_t> head(4 * n);
  std::vector<int64_t> block_map;
  int64_t blocks = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = targets[i];
    const at::Tensor& o = onlines[i];
    TORCH_CHECK(t.device() == t0.device() && o.device() == t0.device(), "pair ", i,
                ": target and online must be on ", t0.device(), " (the device of targets[0]), "
                "got ", t.device(), " and ", o.device());
    TORCH_CHECK_TYPE(t.scalar_type() == t0.scalar_type() && o.scalar_type() == o0.scalar_type(),
                     "one launch takes one dtype pair: pair ", i, " has (", t.scalar_type(), ", ",
                     o.scalar_type(), "), pair 0 has (", t0.scalar_type(), ", ",
                     o0.scalar_type(), ")");
    TORCH_CHECK(o.sizes() == t.sizes(), "pair ", i, ": online must have the target's shape ",
                t.sizes(), ", got ", o.sizes());
    TORCH_CHECK(t.is_non_overlapping_and_dense() && o.strides() == t.strides(), "pair ", i,
                ": target must be dense and online must have its strides, got target strides ",
                t.strides(), " and online strides ", o.strides());
    const int64_t numel = t.numel();
    const int64_t count = (numel + fc::kLerpBlockElems - 1) / fc::kLerpBlockElems;
    head[i] = reinterpret_cast<int64_t>(t.data_ptr());
    head[n + i] = reinterpret_cast<int64_t>(o.const_data_ptr());
    head[2 * n + i] = numel;
    head[3 * n + i] = blocks;
    block_map.insert(block_map.end(), count, i);
    blocks += count;
  }
  if (blocks == 0) return;
  auto host = at::empty({4 * n + blocks}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::copy(head.begin(), head.end(), h);
  std::copy(block_map.begin(), block_map.end(), h + 4 * n);
  const c10::cuda::CUDAGuard guard(t0.device());
  // non_blocking from pinned memory: the caching host allocator keeps `host` alive until the copy
  // has run on the current stream, and the kernel below is ordered after it on that stream.
  const at::Tensor meta = host.to(t0.device(), /*non_blocking=*/true);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  check_launch(fc::lerp_multi_tensor(meta.const_data_ptr<int64_t>(), n, blocks, target_dtype,
                                     online_dtype, weight, stream.stream()),
               "momentum update");
}

void check_int64_rows(const OptTensor& src, const OptTensor& buf, const char* name,
                      int64_t batch, int64_t size, const at::Device& device) {
  TORCH_CHECK(src.has_value() == buf.has_value(), name, " and the queue's ", name,
              " buffer must be given together");
  if (!src) return;
  for (const auto& [t, what, rows] : {std::make_tuple(*src, "", batch),
                                      std::make_tuple(*buf, " buffer", size)}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, what, " must be int64, got ",
                     t.scalar_type());
    TORCH_CHECK(t.device() == device && t.dim() == 1 && t.size(0) == rows && t.is_contiguous(),
                name, what, " must be a contiguous (", rows, ",) tensor on ", device,
                ", got shape ",
                t.sizes(), " on ", t.device());
  }
}

std::tuple<int64_t, int64_t> queue_enqueue(const at::Tensor& dst, const at::Tensor& keys,
                                           int64_t pointer, int64_t count,
                                           const at::Tensor& pointer_buf,
                                           const at::Tensor& count_buf, const OptTensor& dst_labels,
                                           const OptTensor& labels, const OptTensor& dst_indices,
                                           const OptTensor& indices) {
  TORCH_CHECK(dst.is_cuda(), "the queue must be on a CUDA device, got ", dst.device());
  TORCH_CHECK(dst.dim() == 2 && dst.is_contiguous(), "the queue's keys must be a contiguous "
              "(size, dim) tensor, got shape ", dst.sizes(), " and strides ", dst.strides());
  const int64_t size = dst.size(0), dim = dst.size(1);
  TORCH_CHECK(size > 0 && dim > 0, "the queue must have size > 0 and dim > 0, got ", dst.sizes());
  TORCH_CHECK(keys.device() == dst.device(), "keys must be on ", dst.device(),
              " (the queue's device), got ", keys.device());
  TORCH_CHECK(keys.dim() == 2 && keys.size(1) == dim, "keys must have shape (B, ", dim,
              "), got ", keys.sizes());
  TORCH_CHECK(keys.size(0) == 0 || keys.size(1) <= 1 || keys.stride(1) == 1,
              "keys must be contiguous in its last dimension, got strides ", keys.strides());
  const fc::DType src_dtype = to_dtype(keys, "keys");
  const fc::DType dst_dtype = to_dtype(dst, "the queue's keys");
  TORCH_CHECK(pointer >= 0 && pointer < size && count >= 0 && count <= size,
              "pointer must be in [0, ", size, ") and count in [0, ", size, "], got ", pointer,
              " and ", count);
  for (const auto& [buf, name] : {std::make_pair(pointer_buf, "pointer"),
                                  std::make_pair(count_buf, "count")}) {
    TORCH_CHECK(buf.device() == dst.device() && buf.scalar_type() == at::kLong && buf.dim() == 0,
                name, " buffer must be a 0-dim int64 tensor on ", dst.device(), ", got ",
                buf.scalar_type(), " of shape ", buf.sizes(), " on ", buf.device());
  }
  const int64_t batch = keys.size(0);
  check_int64_rows(labels, dst_labels, "labels", batch, size, dst.device());
  check_int64_rows(indices, dst_indices, "indices", batch, size, dst.device());
  const int64_t new_pointer = (pointer + batch) % size;
  const int64_t new_count = std::min(count + batch, size);
  if (batch == 0) return {pointer, count};
  const int64_t rows = std::min(batch, size);
  const c10::cuda::CUDAGuard guard(dst.device());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto ptr = [](const OptTensor& t) -> int64_t* {
    return t ? t->data_ptr<int64_t>() : nullptr;
  };
  check_launch(fc::enqueue(keys.const_data_ptr(), src_dtype, keys.stride(0), dst.data_ptr(),
                           dst_dtype, dim, size, batch - rows, rows, pointer, ptr(labels),
                           ptr(dst_labels), ptr(indices), ptr(dst_indices),
                           pointer_buf.data_ptr<int64_t>(), count_buf.data_ptr<int64_t>(),
                           new_pointer, new_count, stream.stream()),
               "queue enqueue");
  return {new_pointer, new_count};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fastcontrast CUDA kernels: multi-tensor momentum update, ring-buffer enqueue";
  m.def("momentum_update_", &momentum_update,
        "targets[i] <- lerp(targets[i], onlines[i], weight) for all i, one launch (one device, "
        "one dtype pair)",
        py::arg("targets"), py::arg("onlines"), py::arg("weight"));
  m.def("queue_enqueue_", &queue_enqueue,
        "write keys (and labels / indices) into the ring buffer at pointer and store the new "
        "pointer and count; returns (new_pointer, new_count)",
        py::arg("dst"), py::arg("keys"), py::arg("pointer"), py::arg("count"),
        py::arg("pointer_buf"), py::arg("count_buf"), py::arg("dst_labels") = py::none(),
        py::arg("labels") = py::none(), py::arg("dst_indices") = py::none(),
        py::arg("indices") = py::none());
}
