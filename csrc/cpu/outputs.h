// Allocation of the outputs a CPU kernel writes completely (not of accumulators that start at 0).
//
// new_output is at::empty, except that with the environment variable
// FASTCONTRAST_POISON_OUTPUTS=1 (read at every call) the tensor is filled with NaN first, so that
// an element the kernel fails to write shows up in the tests instead of passing as stale memory.
// The Triton host functions (kernels/_common.py) and the torch backend honour the same switch.
#pragma once

#include <ATen/ATen.h>

#include <cstdlib>
#include <cstring>
#include <limits>

namespace fastcontrast {

inline bool poison_outputs() {
  const char* value = std::getenv("FASTCONTRAST_POISON_OUTPUTS");
  return value != nullptr && std::strcmp(value, "1") == 0;
}

inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (poison_outputs()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

}  // namespace fastcontrast
