// Device-side dtype helpers shared by the .cu kernels: conversion to and from the compute type,
// and the dispatch of a runtime DType to a C++ type. No torch headers (see launchers.h).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <utility>

#include "cuda/launchers.h"

namespace fastcontrast {
namespace cuda {

template <typename C, typename T>
__device__ __forceinline__ C to_compute(T v) { return static_cast<C>(v); }
template <>
__device__ __forceinline__ float to_compute<float, __half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ double to_compute<double, __half>(__half v) {
  return static_cast<double>(__half2float(v));
}
template <>
__device__ __forceinline__ float to_compute<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ double to_compute<double, __nv_bfloat16>(__nv_bfloat16 v) {
  return static_cast<double>(__bfloat162float(v));
}

template <typename T, typename C>
__device__ __forceinline__ T from_compute(C v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_compute<__half, float>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __half from_compute<__half, double>(double v) {
  return __double2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_compute<__nv_bfloat16, double>(double v) {
  return __double2bfloat16(v);
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
