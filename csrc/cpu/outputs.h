// Allocation of the outputs a CPU kernel writes completely (not of accumulators that start at 0).
//
// new_output is at::empty, except that with the runtime option poison_outputs
// (runtime_options.h) the tensor is filled with NaN first, so that an element the kernel fails to
// write shows up in the tests instead of passing as stale memory. The Triton host functions
// (kernels/_common.py) and the torch backend honour the same switch.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "cpu/runtime_options.h"

namespace fastcontrast {

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (runtime_options().poison_outputs) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace fastcontrast
