"""The matmul floor: how fast this machine multiplies matrices of the shapes InfoNCE is made of.

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
