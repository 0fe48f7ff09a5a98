// Multi-tensor momentum (EMA) update on CUDA: every (target, online) pair in ONE launch.
//
//   target <- lerp(target, online, w) = m * target + (1 - m) * online,   w = 1 - m
//
// in float (double for double targets) with torch.lerp's two-sided formula, exact at both ends:
//   w < 0.5:  x + w * (y - x)          else:  y - (y - x) * (1 - w)
//
// One CUDA block per kLerpBlockElems elements of a tensor (apex's multi_tensor_apply idea): the
// block reads from the device metadata (launchers.h) which tensor it belongs to and where its
// slice starts. A full slice of a tensor whose addresses are aligned is moved in 16-byte (fp32)
// vectors, kIlp elements per thread per step; a tensor's last slice, or an unaligned tensor,
// takes the scalar loop.
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "cuda/dtypes.cuh"
#include "cuda/launchers.h"

namespace fastcontrast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kIlp = 4;  // elements per thread per step on the vector path
static_assert(kLerpBlockElems % (kThreads * kIlp) == 0, "a block's slice must be whole steps");

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename C>
__device__ __forceinline__ C lerp(C x, C y, C w) {
  return w < C(0.5) ? x + w * (y - x) : y - (y - x) * (C(1) - w);
}

template <typename T, typename O, typename C>
__global__ void __launch_bounds__(kThreads)
    lerp_multi_tensor_kernel(const int64_t* __restrict__ meta, int64_t num_tensors, C w) {
  const int64_t block = blockIdx.x;
  const int64_t t = meta[4 * num_tensors + block];
  T* __restrict__ x = reinterpret_cast<T*>(meta[t]);
  const O* __restrict__ y = reinterpret_cast<const O*>(meta[num_tensors + t]);
  const int64_t numel = meta[2 * num_tensors + t];
  const int64_t start = (block - meta[3 * num_tensors + t]) * kLerpBlockElems;
  const int64_t end = start + kLerpBlockElems < numel ? start + kLerpBlockElems : numel;

  const bool aligned = reinterpret_cast<uintptr_t>(x) % sizeof(Pack<T, kIlp>) == 0 &&
                       reinterpret_cast<uintptr_t>(y) % sizeof(Pack<O, kIlp>) == 0;
  if (aligned && end - start == kLerpBlockElems) {
    for (int64_t i = start + int64_t(threadIdx.x) * kIlp; i < end; i += int64_t(kThreads) * kIlp) {
      Pack<T, kIlp> xv = *reinterpret_cast<const Pack<T, kIlp>*>(x + i);
      const Pack<O, kIlp> yv = *reinterpret_cast<const Pack<O, kIlp>*>(y + i);
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        xv.v[k] = from_compute<T>(lerp(to_compute<C>(xv.v[k]), to_compute<C>(yv.v[k]), w));
      }
      *reinterpret_cast<Pack<T, kIlp>*>(x + i) = xv;
    }
  } else {
    for (int64_t i = start + threadIdx.x; i < end; i += kThreads) {
      x[i] = from_compute<T>(lerp(to_compute<C>(x[i]), to_compute<C>(y[i]), w));
    }
  }
}

template <typename T, typename O>
constexpr bool pair_supported() {
  constexpr bool same = std::is_same<T, O>::value;
  constexpr bool master32 = std::is_same<T, float>::value &&
                            (std::is_same<O, __half>::value ||
                             std::is_same<O, __nv_bfloat16>::value);
  constexpr bool master64 = std::is_same<T, double>::value;
  return same || master32 || master64;
}

}  // namespace

bool lerp_pair_supported(DType target, DType online) {
  bool supported = false;
  dispatch_dtype(target, [&](auto t) {
    dispatch_dtype(online, [&](auto o) { supported = pair_supported<decltype(t), decltype(o)>(); });
  });
  return supported;
}

int lerp_multi_tensor(const int64_t* meta, int64_t num_tensors, int64_t num_blocks, DType target,
                      DType online, double weight, void* stream) {
  if (num_blocks == 0) return static_cast<int>(cudaSuccess);
  if (!lerp_pair_supported(target, online)) return static_cast<int>(cudaErrorInvalidValue);
  const auto s = static_cast<cudaStream_t>(stream);
  dispatch_dtype(target, [&](auto t) {
    dispatch_dtype(online, [&](auto o) {
      using T = decltype(t);
      using O = decltype(o);
      if constexpr (pair_supported<T, O>()) {
        using C = typename std::conditional<std::is_same<T, double>::value, double, float>::type;
        lerp_multi_tensor_kernel<T, O, C>
            <<<static_cast<unsigned>(num_blocks), kThreads, 0, s>>>(meta, num_tensors,
                                                                   static_cast<C>(weight));
      }
    });
  });
  return static_cast<int>(cudaGetLastError());
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace fastcontrast
