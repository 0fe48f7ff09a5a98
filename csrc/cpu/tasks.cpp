// Python entry points that expose the task scheduler of tasks.h to the tests: they check its
// logic (dependencies, one run per task, no static assignment of tasks to threads), not timings.
#include "cpu/tasks.h"

#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/grid_tiles.h"
#include "cpu/host_threads.h"
#include "register_ops.h"

namespace fastcontrast {
namespace {

using Trace = std::tuple<std::vector<int64_t>, std::vector<int64_t>, std::vector<int64_t>,
                         std::vector<int64_t>, bool>;

// Runs `size` tasks with the given edges (earlier, later) on every thread. Task `stall` (if
// >= 0) does not return until every other task has finished (or 20 s have passed: then timed_out):
// with a static split of the tasks between threads the stalled thread's share would never run.
// Returns (slot of each task, start rank, finish rank, leave rank of each slot, timed_out); the
// ranks number the starts and finishes of all tasks and the threads' leaving together in the
// order they happened (a slot that never ran keeps -1).
Trace trace(int64_t size, const std::vector<std::pair<int64_t, int64_t>>& edges, int64_t stall) {
  tiles::TaskGraph graph(size);
  for (const auto& [earlier, later] : edges) {
    TORCH_CHECK(earlier >= 0 && earlier < size && later >= 0 && later < size,
                "edge (", earlier, ", ", later, ") out of range for ", size, " tasks");
    graph.add_edge(earlier, later);
  }
  std::vector<int64_t> slot(size, -1), start(size, -1), finish(size, -1);
  std::vector<int64_t> leave(std::max<int64_t>(1, at::get_num_threads()), -1);
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
  }, [&](int64_t s) { leave[s] = events++; });
  return {slot, start, finish, leave, timed_out.load()};
}

// The tiles of a grid of queries by keys in block_rows x chunk tiles, in task order (grid_tiles.h):
// (r0, rows, c0, c1, first tile of its block, last of its block, first of its chunk) each.
std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, bool>> grid_tile_list(
    int64_t n, int64_t m, int64_t block_rows, int64_t chunk) {
  TORCH_CHECK(n >= 0 && m >= 0 && block_rows > 0 && chunk > 0, "invalid grid");
  std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, bool, bool, bool>> out;
  for (const tiles::GridTile& g : tiles::grid_tiles(n, m, block_rows, chunk))
    out.emplace_back(g.r0, g.rows, g.c0, g.c1, g.block_first, g.block_last, g.chunk_first);
  return out;
}

}  // namespace

void register_task_ops(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("task_graph_trace", &trace, kernel_call_guard(),
        "(slot, start rank, finish rank per task, leave rank per thread slot, timed_out) of a "
        "run of the tile scheduler",
        py::arg("size"), py::arg("edges"), py::arg("stall") = -1);
  m.def("grid_order", &tiles::grid_order, "the order of the (block, chunk) tiles of a grid",
        py::arg("blocks"), py::arg("chunks"));
  m.def("grid_tiles", &grid_tile_list,
        "(r0, rows, c0, c1, block_first, block_last, chunk_first) of each tile, in task order",
        py::arg("n"), py::arg("m"), py::arg("block_rows"), py::arg("chunk"));
}

}  // namespace fastcontrast
