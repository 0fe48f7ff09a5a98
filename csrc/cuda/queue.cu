// Ring-buffer enqueue of a negative queue on CUDA: keys (cast to the queue's dtype), optional
// int64 labels and sample indices, and the new pointer and count, in ONE launch.
//
// Source row b in [first_row, first_row + rows) goes to slot (pointer + b) % size; the host
// passes first_row = B - min(B, size) so that a batch larger than the queue writes only its last
// `size` rows, to distinct slots (no write conflicts). A grid-stride loop over the rows x dim
// elements (the division by dim is cheap next to the memory traffic), another over the rows for
// labels / indices, and thread 0 of block 0 stores the new pointer and count.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/dtypes.cuh"
#include "cuda/launchers.h"

namespace fastcontrast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 4096;

template <typename S, typename D>
__global__ void __launch_bounds__(kThreads)
    enqueue_kernel(const S* __restrict__ src, int64_t src_stride, D* __restrict__ dst, int64_t dim,
                   int64_t size, int64_t first_row, int64_t rows, int64_t pointer,
                   const int64_t* __restrict__ src_labels, int64_t* __restrict__ dst_labels,
                   const int64_t* __restrict__ src_indices, int64_t* __restrict__ dst_indices,
                   int64_t* pointer_buf, int64_t* count_buf, int64_t new_pointer,
                   int64_t new_count) {
  // Convert through double when either side is double, else through float.
  using C = typename std::conditional<std::is_same<S, double>::value ||
                                          std::is_same<D, double>::value,
                                      double, float>::type;
  const int64_t stride = int64_t(gridDim.x) * kThreads;
  const int64_t first = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t total = rows * dim;
  for (int64_t e = first; e < total; e += stride) {
    const int64_t r = e / dim;
    const int64_t c = e - r * dim;
    const int64_t b = first_row + r;
    const int64_t slot = (pointer + b) % size;
    dst[slot * dim + c] = from_compute<D>(to_compute<C>(src[b * src_stride + c]));
  }
  for (int64_t r = first; r < rows; r += stride) {
    const int64_t b = first_row + r;
    const int64_t slot = (pointer + b) % size;
    if (src_labels != nullptr) dst_labels[slot] = src_labels[b];
    if (src_indices != nullptr) dst_indices[slot] = src_indices[b];
  }
  if (first == 0) {
    *pointer_buf = new_pointer;
    *count_buf = new_count;
  }
}

}  // namespace

int enqueue(const void* src, DType src_dtype, int64_t src_stride, void* dst, DType dst_dtype,
            int64_t dim, int64_t size, int64_t first_row, int64_t rows, int64_t pointer,
            const int64_t* src_labels, int64_t* dst_labels, const int64_t* src_indices,
            int64_t* dst_indices, int64_t* pointer_buf, int64_t* count_buf, int64_t new_pointer,
            int64_t new_count, void* stream) {
  if (size <= 0 || dim <= 0 || rows < 0) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t work = rows * dim > rows ? rows * dim : rows;
  int64_t blocks = (work + kThreads - 1) / kThreads;
  blocks = blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
  const auto s = static_cast<cudaStream_t>(stream);
  bool dst_known = false;
  const bool src_known = dispatch_dtype(src_dtype, [&](auto s_tag) {
    dst_known = dispatch_dtype(dst_dtype, [&](auto d_tag) {
      using S = decltype(s_tag);
      using D = decltype(d_tag);
      enqueue_kernel<S, D><<<static_cast<unsigned>(blocks), kThreads, 0, s>>>(
          static_cast<const S*>(src), src_stride, static_cast<D*>(dst), dim, size, first_row,
          rows, pointer, src_labels, dst_labels, src_indices, dst_indices, pointer_buf, count_buf,
          new_pointer, new_count);
    });
  });
  if (!src_known || !dst_known) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace cuda
}  // namespace fastcontrast
