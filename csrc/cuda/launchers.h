// Raw-pointer launchers of the fastcontrast CUDA kernels (momentum.cu, queue.cu).
//
// This header includes neither torch nor the CUDA runtime, so that the .cu files compile with a
// plain `nvcc -c` (no torch headers) and the pybind11 layer (cuda_bindings.cpp, built only with a
// CUDA build of torch) can call them. Streams are passed as void* (a cudaStream_t); every launcher
// returns a cudaError_t as an int (0 = success), turned into a message by error_string().
#pragma once

#include <cstdint>

namespace fastcontrast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// Elements per CUDA block of the momentum kernel; the host's block map (below) uses the same.
constexpr int64_t kLerpBlockElems = 4096;

// True for the (target, online) dtype pairs lerp_multi_tensor accepts: equal dtypes, or a
// float32 / float64 target with a lower-precision online tensor.
bool lerp_pair_supported(DType target, DType online);

// targets[i] <- lerp(targets[i], onlines[i], weight) for the T tensors described by `meta`, a
// DEVICE array of int64:
//   [target addresses (T) | online addresses (T) | numels (T) | first block of each tensor (T) |
//    tensor of each block (num_blocks)]
// where tensor i owns blocks first_block[i] .. first_block[i] + ceil(numel_i / kLerpBlockElems)
// - 1.
// Computed in float (double for float64 targets), exact at weight 0 and 1. One launch.
int lerp_multi_tensor(const int64_t* meta, int64_t num_tensors, int64_t num_blocks, DType target,
                      DType online, double weight, void* stream);

// Ring-buffer enqueue: dst[(pointer + b) % size] = src[b] (cast to dst's dtype) for b in
// [first_row, first_row + rows), rows of `dim` elements (src row stride src_stride, dst
// contiguous), the same for the optional int64 labels / indices (nullptr pairs to skip), then
// *pointer_buf = new_pointer and *count_buf = new_count. One launch.
int enqueue(const void* src, DType src_dtype, int64_t src_stride, void* dst, DType dst_dtype,
            int64_t dim, int64_t size, int64_t first_row, int64_t rows, int64_t pointer,
            const int64_t* src_labels, int64_t* dst_labels, const int64_t* src_indices,
            int64_t* dst_indices, int64_t* pointer_buf, int64_t* count_buf, int64_t new_pointer,
            int64_t new_count, void* stream);

// The CUDA runtime's message for an error code returned above.
const char* error_string(int code);

}  // namespace cuda
}  // namespace fastcontrast
