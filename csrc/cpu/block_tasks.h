// The task graph of the one-pass kernels on CPU that hold a query block's whole row of keys
// (infonce_fused.cpp, matryoshka.cpp): one task per query block (its tiles over every key: the
// row log-sum-exp needs every key before the weights) and, after it, one task per (block, key
// chunk) for the updates of the chunk's rows (dkeys, column statistics), each chunk's updates in
// block order. A block's tiles live in one of `slots` slots until its last chunk update.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include <ATen/Parallel.h>

#include "cpu/tasks.h"
#include "cpu/tile_budget.h"

namespace fastcontrast {
namespace tiles {

// Slots (blocks in memory at once) for nb blocks: one per thread and one more, so that a thread
// can start the next block while the other threads finish a block's chunk updates.
inline int64_t tile_slots(int64_t nb) { return std::min<int64_t>(nb, at::get_num_threads() + 1); }

// Bytes of the tiles in flight: every slot's `per_slot` M x R tiles.
inline int64_t in_flight_tile_bytes(int64_t n, int64_t m, int64_t elem_size, int64_t rows,
                                    int64_t per_slot) {
  return tile_slots((n + rows - 1) / rows) * per_slot * m * rows * elem_size;
}

// R halved (a multiple of 16, down to kMinBlockRows) until the tiles in flight fit in `budget`.
inline int64_t rows_in_budget(int64_t n, int64_t m, int64_t elem_size, int64_t r,
                              int64_t per_slot, int64_t budget) {
  while (r > kMinBlockRows && in_flight_tile_bytes(n, m, elem_size, r, per_slot) > budget)
    r = std::max<int64_t>(kMinBlockRows, r / 2 / 16 * 16);
  return r;
}

// Task b (1 + nc) is block b's, task b (1 + nc) + 1 + k its update of key chunk k. Edges: a block
// task waits for the block that used its slot before and for that block's updates; a chunk
// update waits for its block and for the same chunk's update of the previous block (the sums in
// block order, whichever thread runs them).
struct BlockTask {
  int64_t block, chunk, slot;  // chunk -1: the block's own task
};

inline void add_block_edges(TaskGraph& graph, int64_t nb, int64_t nc, int64_t slots) {
  std::vector<int64_t> last(nc, -1);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t t = b * (1 + nc);
    if (b >= slots) {
      const int64_t before = (b - slots) * (1 + nc);
      for (int64_t k = 0; k <= nc; ++k) graph.add_edge(before + k, t);
    }
    for (int64_t k = 0; k < nc; ++k) {
      graph.add_edge(t, t + 1 + k);
      graph.chain(t + 1 + k, last, {k});
    }
  }
}

inline BlockTask block_task(int64_t task, int64_t nc, int64_t slots) {
  const int64_t b = task / (1 + nc);
  return {b, task % (1 + nc) - 1, b % slots};
}

}  // namespace tiles
}  // namespace fastcontrast
