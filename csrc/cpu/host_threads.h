// Serial host passes around the CPU kernels, for a busy CPU.
//
// Why: the O((N + M) D) host passes of a loss (norms, positive scores, the gradient epilogue)
// are ATen elementwise ops, each an OpenMP parallel region with a closing barrier. When the
// cores are shared (DataLoader workers, a second job), the OS deschedules one thread of the
// team and every other thread waits at that barrier for the rest of a time slice: measured
// beside busy processes, info_nce's host ops at N = 4096 took 605 ms instead of a few. Run on
// the calling thread alone they take a few milliseconds wherever the cores are shared (each is
// a memory-bound pass of a few MB), while the kernels keep every thread.
//
// How: serial_host_begin() sets the calling thread's OpenMP thread count to 1 (omp_set_num_threads
// acts on the calling thread only, and ATen's parallel_for asks omp_get_max_threads), remembering
// the count; every kernel entry point holds a KernelThreads guard (kernel_call_guard), which gives
// the kernel the remembered count back for its duration. fastcontrast._host.serial_host_ops is
// the Python side. Without OpenMP both are no-ops.
#pragma once

#include <torch/extension.h>

namespace fastcontrast {

// Enters a serial host scope on this thread: returns true if it entered one, false if one was
// already open (nested scopes leave the outer one in charge).
bool serial_host_begin();
// Leaves the scope that serial_host_begin() entered (entered: its return value).
void serial_host_end(bool entered);

// For a kernel's duration, inside a serial host scope: the thread count from before the scope.
class KernelThreads {
 public:
  KernelThreads();
  ~KernelThreads();
  KernelThreads(const KernelThreads&) = delete;
  KernelThreads& operator=(const KernelThreads&) = delete;

 private:
  bool restored_;
};

// The call guard of every kernel entry point: the GIL released, the kernel's threads restored.
using kernel_call_guard = pybind11::call_guard<pybind11::gil_scoped_release, KernelThreads>;

}  // namespace fastcontrast
