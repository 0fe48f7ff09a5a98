"""The matmul floor: how fast this machine multiplies matrices of the shapes InfoNCE is made of.

``fastcontrast bench`` takes its floor from the products the kernels actually run
(``kernel_products`` below); core_targets.py and the pytest-benchmark suite use the fixed
row-block shape that follows.

A fused InfoNCE forward+backward on N x M x D is at least 3 such products (scores, dQ, dK) =
6 N M D FLOP. The floor of a run is that work at the BEST torch.mm rate measured in the same run
on a row block of the problem: 1024 query rows x 16384 keys x 256 features by default, in the
three orientations a blocked kernel issues (each timed as a median; the floor takes the fastest):

    "scores"  (rows x D) @ (D x keys)              S = Q_blk K^T        (K^T a transposed view)
    "dq"      (rows x keys) @ (keys x D)           dQ_blk = P K
    "dk"      (keys x D) += (keys x rows) @ (rows x D)   dK += P^T Q_blk  (addmm, P^T a view)
"""
import torch

FLOOR_SHAPE = (1024, 16384, 256)  # (rows, keys, dim)
ORIENTATIONS = ("scores", "dq", "dk")


def matmul_flop(rows, keys, dim):
    """FLOP of one rows x keys x dim product (2 per multiply-add)."""
    return 2 * rows * keys * dim


def matmul_steps(rows, keys, dim, seed=0, dtype=torch.float32, device="cpu"):
    """{orientation: zero-argument callable running that product once} on fixed random
    operands of ``dtype`` on ``device`` (allocated once here, so a call measures the product,
    not the allocation)."""
    gen = torch.Generator().manual_seed(seed)
    like = {"dtype": dtype, "device": device}
    q = torch.randn(rows, dim, generator=gen).to(**like)
    k = torch.randn(keys, dim, generator=gen).to(**like)
    p = torch.randn(rows, keys, generator=gen).to(**like)
    dk = torch.zeros(keys, dim, **like)
    scores_out = torch.empty(rows, keys, **like)
    dq_out = torch.empty(rows, dim, **like)
    return {
        "scores": lambda: torch.mm(q, k.T, out=scores_out),
        "dq": lambda: torch.mm(p, k, out=dq_out),
        "dk": lambda: dk.addmm_(p.T, q),
    }


def repeated(step, times):
    """A step that runs ``step`` ``times`` times (divide its time by ``times``): averages out the
    timer and the scheduler on products that take only tens of milliseconds."""
    def run():
        for _ in range(times):
            step()
    return run


def floor_from_medians(median_s, shape, work_flop):
    """The floor for ``work_flop`` given the median seconds per product of each orientation.

    Returns {"gflops": {orientation: rate}, "best": orientation, "best_gflops", "floor_s"}."""
    flop = matmul_flop(*shape)
    gflops = {name: flop / s / 1e9 for name, s in median_s.items()}
    best = max(gflops, key=gflops.get)
    return {"shape": list(shape), "gflops": gflops, "best": best, "best_gflops": gflops[best],
            "floor_s": work_flop / (gflops[best] * 1e9)}


# ---------------------------------------------------------------------------------------------
# The products fastcontrast's kernels run (the floor of `fastcontrast bench`)
#
# The floor of a bench run is the best warm rate over exactly these shapes, so that no kernel can
# beat it by running a product shape the floor did not measure. Each product is named by the
# backend whose loop issues it; (rows, keys, dim) = (block rows R, M, D):
#
#   csrc/cpu/infonce.cpp, infonce_fused.cpp (keys x queries tile, R rows a block):
#     "cpu scores"  tile (M x R) = keys (M x D) @ q_blk^T (D x R, a transposed view)
#     "cpu dq"      dq_blk (R x D) = W^T (R x M, a view of the tile) @ keys (M x D)
#     "cpu dk"      dkeys (M x D) += W (M x R) @ (c q_blk) (R x D)          (addmm_)
#   fastcontrast/_torch_chunked.py (R = chunk rows):
#     "torch scores"  s (R x M) = q_chunk (R x D) @ keys^T (D x M, a view)
#     "torch dq"      dq_chunk (R x D) = h (R x M) @ keys (M x D)
#     "torch dk"      dkeys (M x D) += h^T (M x R, a view) @ q_chunk (R x D)  (addmm_)

# csrc/cpu/tile_budget.h: choose_block_rows and its constants (tests check them against the
# kernel's products recorded by the profiler).
CPU_MIN_TILE_BYTES = 16 << 20
CPU_MIN_BLOCK_ROWS = 32
CPU_MAX_BLOCK_ROWS = 512
PRODUCTS = ("scores", "dq", "dk")


def cpu_tile_budget(n, m, d, elem_size=4, large_tile=False):
    """csrc/cpu/tile_budget.h tile_budget: the bytes one score tile may take."""
    budget = max(CPU_MIN_TILE_BYTES, (n + m) * d * elem_size // 2)
    return 2 * budget if large_tile else budget


def cpu_block_rows(n, m, d, elem_size=4, large_tile=False):
    """The block rows R of csrc/cpu/tile_budget.h for an N x M x D problem. ``large_tile``: the
    forward alone and the symmetric (column-term) backward, whose tile budget is doubled; the
    fused one-directional forward+backward has ``large_tile=False``."""
    b = cpu_tile_budget(n, m, d, elem_size, large_tile) // max(m * elem_size, 1)
    b = min(max(b // 16 * 16, CPU_MIN_BLOCK_ROWS), CPU_MAX_BLOCK_ROWS)
    return max(1, min(b, n))


def torch_chunk_rows(n, m, chunk_elements=None):
    """The chunk rows of fastcontrast/_torch_chunked.py on CPU (its score-element budget)."""
    if chunk_elements is None:
        from fastcontrast import _torch_chunked

        chunk_elements = _torch_chunked._CPU_CHUNK_ELEMENTS
    return min(n, max(1, chunk_elements // max(1, m)))


def _blocks(n, rows):
    """The distinct row counts of the blocks of n rows taken ``rows`` at a time (tail included;
    one block of n when ``rows`` exceeds n)."""
    rows = min(rows, n)
    return sorted({rows} | ({n % rows} if n % rows else set()))


CPU_CHUNK_BYTES = 2 << 20  # csrc/cpu/tile_budget.h's kChunkBytes


def cpu_chunk_keys(rows, elem_size=4):
    """Keys per chunk of the C++ kernels' chunked backward (tile_budget.h chunk_keys)."""
    return max(rows, CPU_CHUNK_BYTES // (rows * elem_size) // 16 * 16)


def cpu_task_block_rows(block, n, threads):
    """csrc/cpu/grid_tiles.h task_block_rows: R halved (to a multiple of 16, at least
    CPU_MIN_BLOCK_ROWS) while the N rows make fewer than two blocks per thread."""
    while block > CPU_MIN_BLOCK_ROWS and -(-n // block) < 2 * threads:
        block = max(CPU_MIN_BLOCK_ROWS, block // 2 // 16 * 16)
    return block


def cpu_in_flight_rows(block, n, m, d, elem_size, threads):
    """csrc/cpu/infonce_fused.cpp in_flight_rows: the fused forward+backward keeps up to threads + 1
    M x R tiles at once; R is halved (to a multiple of 16, at least CPU_MIN_BLOCK_ROWS) until
    they fit in 1.5 tile budgets."""
    budget = 3 * cpu_tile_budget(n, m, d, elem_size) // 2

    def tiles_bytes(rows):
        return min(-(-n // rows), threads + 1) * m * rows * elem_size

    while block > CPU_MIN_BLOCK_ROWS and tiles_bytes(block) > budget:
        block = max(CPU_MIN_BLOCK_ROWS, block // 2 // 16 * 16)
    return block


def kernel_products(n, m, d, elem_size=4, symmetric=False, backends=("cpu", "torch"),
                    threads=None):
    """{(backend, product, rows, keys, dim)}: every product shape the backends' kernels run in
    one forward+backward of an N x M x D problem on ``threads`` threads (default: torch's).

    The cpu backend's task kernels: the one-directional fused forward+backward runs R x M score
    tiles and dq products, and dkeys updates by key chunks; ``symmetric`` (the column-term path)
    runs every product on R x C tiles of (query block, key chunk)."""
    out = set()
    if "cpu" in backends:
        threads = torch.get_num_threads() if threads is None else threads
        block = cpu_task_block_rows(cpu_block_rows(n, m, d, elem_size, large_tile=symmetric), n,
                                    threads)
        if not symmetric:
            block = cpu_in_flight_rows(block, n, m, d, elem_size, threads)
        key_chunks = _blocks(m, cpu_chunk_keys(block, elem_size))
        for rows in _blocks(n, block):
            if symmetric:
                out |= {("cpu", product, rows, keys, d) for product in PRODUCTS
                        for keys in key_chunks}
                continue
            out |= {("cpu", "scores", rows, m, d), ("cpu", "dq", rows, m, d)}
            out |= {("cpu", "dk", rows, keys, d) for keys in key_chunks}
    if "torch" in backends:
        for rows in _blocks(n, torch_chunk_rows(n, m)):
            out |= {("torch", product, rows, m, d) for product in PRODUCTS}
    return out


def product_name(product):
    """'cpu dq 512 x 8192 x 256' for (backend, product, rows, keys, dim)."""
    backend, name, rows, keys, dim = product
    return f"{backend} {name} {rows} x {keys} x {dim}"


def product_step(product, seed=0, dtype=torch.float32, device="cpu"):
    """A zero-argument callable running one product of kernel_products in the backend's own
    layout (transposed views where the kernel passes them) on fixed random operands."""
    backend, name, rows, keys, dim = product
    gen = torch.Generator().manual_seed(seed)
    like = {"dtype": dtype, "device": device}
    q = torch.randn(rows, dim, generator=gen).to(**like)
    k = torch.randn(keys, dim, generator=gen).to(**like)
    dk = torch.zeros(keys, dim, **like)
    if backend == "cpu":  # the tile is keys x rows
        tile = torch.randn(keys, rows, generator=gen).to(**like)
        dq_out = torch.empty(rows, dim, **like)
        steps = {"scores": lambda: torch.mm(k, q.T, out=tile),
                 "dq": lambda: torch.mm(tile.T, k, out=dq_out),
                 "dk": lambda: dk.addmm_(tile, q)}
    elif backend == "torch":  # the chunk is rows x keys
        h = torch.randn(rows, keys, generator=gen).to(**like)
        dq_out = torch.empty(rows, dim, **like)
        steps = {"scores": lambda: torch.mm(q, k.T, out=h),
                 "dq": lambda: torch.mm(h, k, out=dq_out),
                 "dk": lambda: dk.addmm_(h.T, q)}
    else:
        raise ValueError(f"unknown backend {backend!r} (cpu, torch)")
    return steps[name]
