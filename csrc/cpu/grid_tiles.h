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

// A tile of the grid: queries r0 .. r0 + rows against keys c0 .. c1, and its place in the list
// order of its block's and its chunk's tiles. The kernels zero a block's (chunk's) gradient rows
// in its first tile and finish them in its last, inside the tasks: no parallel ATen op, and so no
// barrier, before or after the region.
struct GridTile {
  int64_t r0, rows, c0, c1;
  bool block_first, block_last, chunk_first;
};

// The tiles of an nb x nc grid of blocks of `block_rows` rows (n queries) by chunks of `chunk`
// keys (m keys), in grid_order (tasks.h).
inline std::vector<GridTile> grid_tiles(int64_t n, int64_t m, int64_t block_rows, int64_t chunk) {
  const int64_t nb = (n + block_rows - 1) / block_rows, nc = (m + chunk - 1) / chunk;
  std::vector<GridTile> out;
  std::vector<char> block_seen(nb, 0), chunk_seen(nc, 0);
  std::vector<int64_t> block_last(nb, -1);
  for (const auto& [b, c] : grid_order(nb, nc)) {
    const int64_t r0 = b * block_rows, c0 = c * chunk;
    out.push_back({r0, std::min(block_rows, n - r0), c0, std::min(m, c0 + chunk), !block_seen[b],
                   false, !chunk_seen[c]});
    block_seen[b] = chunk_seen[c] = 1;
    block_last[b] = static_cast<int64_t>(out.size()) - 1;
  }
  for (const int64_t t : block_last)
    if (t >= 0) out[t].block_last = true;  // -1: a block without tiles (no keys)
  return out;
}

// Calls fn(tile, pc, scores, slot) for every tile of R queries by C keys as a task (tasks.h; the
// tiles of a block and of a chunk chained in grid order): pc the Problem of the queries against
// the tile's keys (KeyChunk: key j is key c0 + j; query indices global), scores (c1 - c0, rows) =
// keys[c0:c1] @ q[r0:r0+rows]^T with the id-masked (and filtered) entries at -inf, in the buffer of the calling
// thread (slot).
template <typename T, typename Fn>
void for_each_grid_tile(const Problem<T>& p, const at::Tensor& beta, const Mask& mask,
                        int64_t block_rows, int64_t chunk, Fn&& fn) {
  const int64_t nb = (p.n + block_rows - 1) / block_rows;
  const std::vector<GridTile> grid = grid_tiles(p.n, p.m, block_rows, chunk);
  TaskGraph graph(static_cast<int64_t>(grid.size()));
  std::vector<int64_t> last(nb + (p.m + chunk - 1) / chunk, -1);
  for (int64_t t = 0; t < graph.size(); ++t)
    graph.chain(t, last, {grid[t].r0 / block_rows, nb + grid[t].c0 / chunk});
  std::vector<at::Tensor> buffers(static_cast<size_t>(at::get_num_threads()));
  graph.run([&](int64_t t, int64_t slot) {
    const GridTile& g = grid[t];
    at::Tensor& buffer = buffers[slot];
    if (!buffer.defined()) buffer = at::empty({chunk * block_rows}, p.q.options());
    const KeyChunk part(p.keys, beta, mask, g.c0, g.c1);
    const Problem<T> pc(p.q, part.keys, p.alpha_tensor, part.beta, part.mask, false, block_rows);
    at::Tensor scores = buffer.narrow(0, 0, (g.c1 - g.c0) * g.rows).view({g.c1 - g.c0, g.rows});
    at::mm_out(scores, part.keys, p.q.narrow(0, g.r0, g.rows).t());
    pc.mask_tile(g.r0, g.rows, scores);
    fn(g, pc, scores, slot);
  });
}

}  // namespace tiles
}  // namespace fastcontrast
