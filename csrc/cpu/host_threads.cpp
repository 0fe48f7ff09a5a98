// The serial host scope of host_threads.h and its Python entry points.
#include "cpu/host_threads.h"

#include <ATen/Parallel.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "register_ops.h"

namespace fastcontrast {
namespace {

// The calling thread's thread count before its open serial host scope; 0: no scope open.
thread_local int kernel_threads = 0;

void set_thread_count(int threads) {
#ifdef _OPENMP
  omp_set_num_threads(threads);
#else
  (void)threads;
#endif
}

}  // namespace

bool serial_host_begin() {
  if (kernel_threads > 0) return false;
  kernel_threads = at::get_num_threads();
  set_thread_count(1);
  return true;
}

void serial_host_end(bool entered) {
  if (!entered || kernel_threads == 0) return;
  set_thread_count(kernel_threads);
  kernel_threads = 0;
}

KernelThreads::KernelThreads() : restored_(kernel_threads > 1) {
  if (restored_) set_thread_count(kernel_threads);
}

KernelThreads::~KernelThreads() {
  if (restored_) set_thread_count(1);
}

void register_host_thread_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("serial_host_begin", &serial_host_begin,
        "enter a serial host scope on this thread (ATen ops on one thread, kernels on all); "
        "True if entered, False if one was open");
  m.def("serial_host_end", &serial_host_end,
        "leave the scope serial_host_begin entered (its return value)", py::arg("entered"));
  m.def("get_num_threads", [] { return at::get_num_threads(); },
        "the calling thread's ATen thread count (1 inside a serial host scope)");
}

}  // namespace fastcontrast
