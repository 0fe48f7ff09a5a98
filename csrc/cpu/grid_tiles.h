// The grid of tiles of the full-product kernels on CPU (infonce.cpp, infonce_fused.cpp): query
// blocks of R rows by key chunks of C keys, each tile a task of one parallel region (tasks.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/infonce.h"
#include "cpu/lse_tiles.h"
#include "cpu/tasks.h"

namespace fastcontrast {
namespace tiles {

// Rows per query block of the task kernels: the Problem's R (the tile budget), halved while
// there are fewer than two blocks per thread to share out (down to kMinBlockRows); a forced size
// (tests) as given.
inline int64_t task_rows(int64_t n, int64_t r, int64_t requested) {
  if (requested > 0) return r;
  const int64_t threads = at::get_num_threads();
  while (r > kMinBlockRows && (n + r - 1) / r < 2 * threads)
    r = std::max<int64_t>(kMinBlockRows, r / 2 / 16 * 16);
  return r;
}

template <typename T>
int64_t task_block_rows(const Problem<T>& p, int64_t requested) {
  return task_rows(p.n, p.block_rows, requested);
}

// Calls fn(r0, rows, c0, pc, tile, slot) for every tile of R queries by C keys as a task
// (tasks.h; grid_order, the tiles of a block and of a chunk chained in that order): pc the
// Problem of the queries against the chunk's keys (KeyChunk: key j is key c0 + j; query indices
// global), tile (c1 - c0, rows) = keys[c0:c1] @ q[r0:r0+rows]^T with the id-masked entries at
// -inf, in the buffer of the calling thread (slot).
template <typename T, typename Fn>
void for_each_grid_tile(const Problem<T>& p, const at::Tensor& beta, const Mask& mask,
                        int64_t block_rows, int64_t chunk, Fn&& fn) {
  const int64_t nb = (p.n + block_rows - 1) / block_rows, nc = (p.m + chunk - 1) / chunk;
  const auto order = grid_order(nb, nc);
  TaskGraph graph(static_cast<int64_t>(order.size()));
  std::vector<int64_t> last(nb + nc, -1);
  for (int64_t t = 0; t < graph.size(); ++t)
    graph.chain(t, last, {order[t].first, nb + order[t].second});
  std::vector<at::Tensor> buffers(static_cast<size_t>(at::get_num_threads()));
  graph.run([&](int64_t t, int64_t slot) {
    const int64_t r0 = order[t].first * block_rows, rows = std::min(block_rows, p.n - r0);
    const int64_t c0 = order[t].second * chunk, c1 = std::min(p.m, c0 + chunk);
    at::Tensor& buffer = buffers[slot];
    if (!buffer.defined()) buffer = at::empty({chunk * block_rows}, p.q.options());
    const KeyChunk part(p.keys, beta, mask, c0, c1);
    const Problem<T> pc(p.q, part.keys, p.alpha_tensor, part.beta, part.mask, false, block_rows);
    at::Tensor tile = buffer.narrow(0, 0, (c1 - c0) * rows).view({c1 - c0, rows});
    at::mm_out(tile, part.keys, p.q.narrow(0, r0, rows).t());
    if (pc.row_ids) pc.mask_equal_ids(r0, rows, tile);
    fn(r0, rows, c0, pc, tile, slot);
  });
}

}  // namespace tiles
}  // namespace fastcontrast
