// Device-side dtype helpers shared by the .cu kernels: conversion to and from the compute type,
// and the dispatch of a runtime DType to a C++ type. No torch headers (see launchers.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>
#include <utility>

#include "cuda/launchers.h"

namespace fastcontrast {
namespace cuda {

// The 16-bit storage types' conversions, by name: torch's CUDA builds turn their implicit ones
// off (__CUDA_NO_HALF_CONVERSIONS__, __CUDA_NO_BFLOAT16_CONVERSIONS__). Widening to float is
// exact; narrowing from float or double rounds to nearest even.
template <typename T>
struct Storage16;
template <>
struct Storage16<__half> {
  static __device__ __forceinline__ float widen(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half narrow(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ __half narrow(double v) { return __double2half(v); }
};
template <>
struct Storage16<__nv_bfloat16> {
  static __device__ __forceinline__ float widen(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 narrow(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ __nv_bfloat16 narrow(double v) { return __double2bfloat16(v); }
};

template <typename T>
constexpr bool is_storage16 =
    std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

// A stored value of type T in the compute type C (float or double).
template <typename C, typename T>
__device__ __forceinline__ C to_compute(T v) {
  if constexpr (is_storage16<T>) {
    return static_cast<C>(Storage16<T>::widen(v));
  } else {
    return static_cast<C>(v);
  }
}

// A compute value (float or double) stored as T.
template <typename T, typename C>
__device__ __forceinline__ T from_compute(C v) {
  if constexpr (is_storage16<T>) {
    return Storage16<T>::narrow(v);
  } else {
    return static_cast<T>(v);
  }
}

// Calls f(T{}) with T the C++ type of `dtype`; returns false for an unknown value.
template <typename F>
bool dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: f(float{}); return true;
    case DType::kFloat64: f(double{}); return true;
    case DType::kFloat16: f(__half{}); return true;
    case DType::kBFloat16: f(__nv_bfloat16{}); return true;
  }
  return false;
}

}  // namespace cuda
}  // namespace fastcontrast
