// The process-wide options of runtime_options.h and their Python entry points.
#include "cpu/runtime_options.h"

#include <torch/extension.h>

#include <atomic>
#include <tuple>

#include "register_ops.h"

namespace fastcontrast {
namespace {

// Atomics: a setter on the Python thread and kernels on worker threads may meet.
std::atomic<bool> shared_shift_option{RuntimeOptions{}.shared_shift};
std::atomic<bool> poison_outputs_option{RuntimeOptions{}.poison_outputs};

}  // namespace

RuntimeOptions runtime_options() {
  return {shared_shift_option.load(std::memory_order_relaxed),
          poison_outputs_option.load(std::memory_order_relaxed)};
}

void set_runtime_options(const RuntimeOptions& options) {
  shared_shift_option.store(options.shared_shift, std::memory_order_relaxed);
  poison_outputs_option.store(options.poison_outputs, std::memory_order_relaxed);
}

void register_runtime_options(pybind11::module_& m) {
  namespace py = pybind11;
  m.def(
      "set_runtime_options",
      [](bool shared_shift, bool poison_outputs) {
        set_runtime_options({shared_shift, poison_outputs});
      },
      "set the process-wide switches of the CPU kernels (see get_runtime_options)",
      py::arg("shared_shift"), py::arg("poison_outputs"));
  m.def(
      "get_runtime_options",
      [] {
        const RuntimeOptions options = runtime_options();
        return std::make_tuple(options.shared_shift, options.poison_outputs);
      },
      "(shared_shift, poison_outputs): whether the log-sum-exp kernels use the shared-shift "
      "passes (default True), and whether kernel outputs are NaN-filled before they are "
      "written (default False, for the tests)");
}

}  // namespace fastcontrast
