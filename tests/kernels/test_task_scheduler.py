"""The C++ tile scheduler (csrc/cpu/tasks.h): its logic, not its timing.

One parallel region per kernel call, every thread taking the first ready task: each task runs
once, after its dependencies, tiles that update the same rows in their list order, and no task
is bound to a thread in advance, so that a thread the OS deschedules does not hold up the work
that does not depend on it. The kernels built on it stay bitwise deterministic.
"""
import pytest
import torch


from .._helpers import backend_usable

pytestmark = pytest.mark.skipif(not backend_usable("cpu"), reason="C++ extension unavailable")


def test_every_task_once_after_its_dependencies(ext, two_threads):
    """A random DAG (edges from lower to higher indices): every task runs exactly once, and no
    task starts before all of its predecessors have finished."""
    gen = torch.Generator().manual_seed(3)
    size = 200
    edges = [(earlier, later) for later in range(1, size)
             for earlier in torch.randint(0, later, (2,), generator=gen).tolist()]
    slot, start, finish, _, timed_out = ext.task_graph_trace(size, edges)
    assert not timed_out
    assert sorted(start + finish) == list(range(2 * size))  # one start, one finish each
    assert all(s < f for s, f in zip(start, finish))
    assert set(slot) <= {0, 1}
    for earlier, later in edges:
        assert finish[earlier] < start[later], (earlier, later)


def test_chain_runs_in_list_order(ext, two_threads):
    """A chain 0 -> 1 -> ... -> 49 runs strictly one task after the other, in order."""
    size = 50
    _, start, finish, _, timed_out = ext.task_graph_trace(size,
                                                          [(t, t + 1) for t in range(size - 1)])
    assert not timed_out
    assert start == list(range(0, 2 * size, 2)) and finish == list(range(1, 2 * size, 2))


def test_a_stalled_thread_does_not_hold_up_independent_tasks(ext, two_threads):
    """Task 0 blocks its thread until every other task has finished: the other thread must take
    all 99 of them (a static split would leave half of them to the blocked thread and never
    finish; the probe gives up after 20 s and reports it)."""
    size = 100
    slot, start, finish, _, timed_out = ext.task_graph_trace(size, [], stall=0)
    assert not timed_out
    assert finish[0] == max(finish)
    assert all(slot[t] != slot[0] for t in range(1, size))


def test_threads_leave_together_after_the_last_task(ext, two_threads):
    """A thread left without a task waits (asleep) for the task still running instead of going
    on to the region's closing barrier, where OpenMP spins: with task 0 stalled until every other
    task is done, the other thread leaves only after task 0 has finished, and so does every
    thread in a run without a stall."""
    for stall in (0, -1):
        slot, _, finish, leave, timed_out = ext.task_graph_trace(40, [], stall=stall)
        assert not timed_out
        ran = set(slot)
        assert all(leave[s] > max(finish) for s in ran), (stall, leave, max(finish))


@pytest.mark.parametrize("blocks,chunks", [(1, 1), (3, 3), (2, 5), (5, 2), (4, 7)])
def test_grid_order_covers_the_grid_in_independent_rounds(ext, blocks, chunks):
    """Every (block, chunk) once; each run of min(blocks, chunks) consecutive tiles shares no
    block and no chunk, so a round's tiles can run on different threads at once."""
    order = ext.grid_order(blocks, chunks)
    assert sorted(order) == [(b, c) for b in range(blocks) for c in range(chunks)]
    width = min(blocks, chunks)
    for r in range(0, len(order), width):
        round_ = order[r:r + width]
        assert len({b for b, _ in round_}) == width and len({c for _, c in round_}) == width


@pytest.mark.parametrize("n,m,rows,chunk", [(1, 1, 1, 1), (5, 0, 4, 8), (0, 5, 4, 8),
                                             (301, 283, 32, 96), (64, 500, 32, 96),
                                             (500, 64, 32, 16), (8192, 8192, 512, 1024)])
def test_grid_tiles_zero_and_finish_each_block_once(ext, n, m, rows, chunk):
    """The tiles of the full-product kernels cover the grid once, each with its true size, and
    mark the first tile (in task order) of every block and chunk, where the kernels zero the
    gradient rows inside the task, and the last tile of every block, where they scale them: one
    of each per block and chunk, so that no ATen op over the whole gradient runs outside the
    tasks."""
    tiles = ext.grid_tiles(n, m, rows, chunk)
    blocks, chunks = -(-n // rows), -(-m // chunk)
    assert len(tiles) == blocks * chunks
    cells = {(r0, c0) for r0, _, c0, *_ in tiles}
    assert cells == {(b * rows, c * chunk) for b in range(blocks) for c in range(chunks)}
    for r0, rows_, c0, c1, *_ in tiles:
        assert rows_ == min(rows, n - r0) and c1 == min(m, c0 + chunk)
    for key, flag in ((0, 4), (2, 6)):  # (block, block_first), (chunk, chunk_first)
        seen = []
        for t in tiles:
            first = t[key] not in seen
            assert t[flag] == first
            seen.append(t[key])
    order = [t[0] for t in tiles]
    for t_index, t in enumerate(tiles):
        assert t[5] == (t[0] not in order[t_index + 1:])  # block_last


@pytest.mark.parametrize("backend", ["cpu"])  # both sets of passes (conftest)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_infonce_kernels_bitwise_deterministic(ext, threads, backend):
    """The task-scheduled forward, backward and one-pass forward with gradient give the same
    bits on every call and for every thread count (each block's and chunk's updates in a fixed
    order), with small forced blocks for many tasks."""
    previous = torch.get_num_threads()
    gen = torch.Generator().manual_seed(11)
    n, m, d = 301, 283, 7
    q, k = torch.randn(n, d, generator=gen), torch.randn(m, d, generator=gen)
    alpha, beta = torch.full((n,), 3.0), torch.rand(m, generator=gen) + 0.5
    g = torch.rand(n, generator=gen)

    def run():
        row, col = ext.masked_lse_forward(q, k, alpha, beta, with_col_lse=True, block_rows=32)
        grads = ext.masked_lse_backward(q, k, alpha, beta, row, g, col, g[:m], block_rows=32)
        fused = ext.masked_lse_forward_with_grad(q, k, alpha, beta, g, block_rows=32)
        return [row, col, *grads, *fused]

    try:
        torch.set_num_threads(1)
        reference = run()
        torch.set_num_threads(threads)
        for _ in range(3):
            for a, b in zip(run(), reference):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2, 3, 4, 8, 16])
@pytest.mark.parametrize("n,m,d", [(16384, 16384, 256), (8192, 8192, 256), (65536, 4096, 128)])
def test_fused_plan_bounds_the_tiles_in_flight(ext, threads, n, m, d):
    """The one-pass forward with gradient keeps a block's M x R tile until the block's last dkeys
    update, in up to threads + 1 slots: R is chosen so that those tiles together stay within 1.5
    tile budgets (or R is at its floor, 32 rows), the slots never exceed the blocks, and there are
    still at least two blocks per thread where R allows. At N = M = 16384, D = 256 fp32 on 2
    threads: R = 128, 3 tiles of 8 MiB (R = 256 and 48 MiB of tiles before)."""
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        rows, slots, tile_bytes, budget = ext.masked_lse_fused_plan(n, m, d, 4)
    finally:
        torch.set_num_threads(previous)
    blocks = -(-n // rows)
    assert slots == min(blocks, threads + 1)
    assert tile_bytes == slots * m * rows * 4
    assert tile_bytes <= 3 * budget // 2 or rows == 32
    assert rows % 16 == 0 and 32 <= rows <= 512
    assert blocks >= 2 * threads or rows == 32
    if (threads, n, m, d) == (2, 16384, 16384, 256):
        assert (rows, slots, tile_bytes) == (128, 3, 3 * 8 * 2**20)
