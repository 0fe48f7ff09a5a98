// Process-wide switches of the CPU kernels, set from Python (fastcontrast._C.set_runtime_options)
// and read by every kernel call through runtime_options():
//   shared_shift    (default true)  the shared-shift passes of the log-sum-exp kernels
//                                   (shared_shift.h); false: the exact two-pass kernels only, for
//                                   the tests and as a baseline.
//   poison_outputs  (default false) new_output (outputs.h) fills every output with NaN before
//                                   the kernel writes it, so that an element the kernel fails to
//                                   write shows up in the tests instead of passing as stale memory.
// A switch set while a kernel runs takes effect from the next call.
#pragma once

namespace fastcontrast {

struct RuntimeOptions {
  bool shared_shift = true;
  bool poison_outputs = false;
};

RuntimeOptions runtime_options();
void set_runtime_options(const RuntimeOptions& options);

}  // namespace fastcontrast
