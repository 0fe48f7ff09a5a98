// The dropped-candidate counts of the false-negative filter on CPU (masked_lse_dropped, see
// infonce.h): the grid of tiles of the forward pass (grid_tiles.h), each tile's GEMM, id mask and
// filter with counting, and nothing else (no exp); with the column rule the M column counts
// follow the N row counts. The tiles of a query block run in order
// (for_each_grid_tile chains them), so each count is added to by one task at a time.
#include "cpu/infonce.h"

#include "cpu/grid_tiles.h"
#include "cpu/lse_tiles.h"

namespace fastcontrast {

at::Tensor masked_lse_dropped(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& alpha,
                              const at::Tensor& beta, const Mask& mask, int64_t block_rows) {
  using namespace tiles;  // NOLINT: the shared pieces (lse_tiles.h, grid_tiles.h)
  at::Tensor counts = at::zeros({q.size(0)}, q.options().dtype(at::kLong));
  if (!mask.filter) return counts;
  Mask counting = mask;
  counting.filter->dropped = counts;
  const bool with_cols = mask.filter->symmetric();  // the column rule: the columns' counts too
  if (with_cols) counting.filter->col_dropped = at::zeros({keys.size(0)}, counts.options());
  const Operands ops = fold_scales(q, keys, alpha, beta, counting);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "masked_lse_dropped", [&] {
    const Problem<scalar_t> p(ops.q, ops.keys, ops.alpha, ops.beta, counting, /*large_tile=*/true,
                              block_rows);
    if (p.n == 0 || p.m == 0) return;
    const int64_t rows = task_block_rows(p, block_rows);
    for_each_grid_tile(p, ops.beta, counting, rows, chunk_keys(rows, sizeof(scalar_t), block_rows),
                       [](const GridTile&, const Problem<scalar_t>&, at::Tensor&, int64_t) {});
  });
  return with_cols ? at::cat({counts, *counting.filter->col_dropped}) : counts;
}

}  // namespace fastcontrast
