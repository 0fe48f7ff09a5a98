// Python entry points that expose the task scheduler of tasks.h to the tests: they check its
// logic (dependencies, one run per task, no static assignment of tasks to threads), not timings.
#include "cpu/tasks.h"

#include <torch/extension.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "register_ops.h"

namespace fastcontrast {
namespace {

// Runs `size` tasks with the given edges (earlier, later) on every thread. Task `stall` (if
// >= 0) does not return until every other task has finished (or 20 s have passed: then timed_out):
// with a static split of the tasks between threads the stalled thread's share would never run.
// Returns (slot of each task, start rank, finish rank, timed_out); the ranks number the starts
// and finishes of all tasks together (0 .. 2 size - 1) in the order they happened.
std::tuple<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>, bool> trace(
    int64_t size, const std::vector<std::pair<int64_t, int64_t>>& edges, int64_t stall) {
  tiles::TaskGraph graph(size);
  for (const auto& [earlier, later] : edges) {
    TORCH_CHECK(earlier >= 0 && earlier < size && later >= 0 && later < size,
                "edge (", earlier, ", ", later, ") out of range for ", size, " tasks");
    graph.add_edge(earlier, later);
  }
  std::vector<int64_t> slot(size, -1), start(size, -1), finish(size, -1);
  std::atomic<int64_t> events{0}, finished{0};
  std::atomic<bool> timed_out{false};
  graph.run([&](int64_t t, int64_t s) {
    slot[t] = s;
    start[t] = events++;
    if (t == stall) {
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(20);
      while (finished.load() < size - 1) {
        if (std::chrono::steady_clock::now() > deadline) {
          timed_out = true;
          break;
        }
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    finish[t] = events++;
    ++finished;
  });
  return {slot, start, finish, timed_out.load()};
}

}  // namespace

void register_task_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("task_graph_trace", &trace, py::call_guard<py::gil_scoped_release>(),
        "(slot, start rank, finish rank per task, timed_out) of a run of the tile scheduler",
        py::arg("size"), py::arg("edges"), py::arg("stall") = -1);
  m.def("grid_order", &tiles::grid_order, "the order of the (block, chunk) tiles of a grid",
        py::arg("blocks"), py::arg("chunks"));
}

}  // namespace fastcontrast
