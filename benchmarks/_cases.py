"""What the benchmarks measure, shared by the pytest-benchmark suite and core_targets.py.

A case is one loss implementation, forward + backward on (query, key) of shape (N, D), N = M:

    "fastcontrast"            fastcontrast.info_nce(q, k, temperature=0.07, backend=...)
    "naive"                   F.cross_entropy(F.normalize(q) @ F.normalize(k).T / tau, arange(N))
    "... symmetric"           the same with symmetric=True (naive: mean of the two directions)

The baseline and the step are the ones of the quick-start demo (fastcontrast.cli.demo), so the
demo and the benchmarks compare exactly the same computations. "auto" is resolved here once: the
C++ backend when its extension is available, else the pure-PyTorch one (see concrete_backend).
"""
from fastcontrast.cli.demo import (  # noqa: F401  (re-exported for the benchmark modules)
    FASTCONTRAST, NAIVE, TEMPERATURE, concrete_backend, forward_backward, loss_function,
    make_inputs, make_step)

DTYPE = "fp32"

# name -> (implementation, symmetric)
CASES = {
    "fastcontrast": (FASTCONTRAST, False),
    "naive": (NAIVE, False),
    "fastcontrast symmetric": (FASTCONTRAST, True),
    "naive symmetric": (NAIVE, True),
}


def case_step(name, query, key, backend="auto", temperature=TEMPERATURE):
    """Zero-argument forward+backward of case ``name`` on the given inputs (returns the loss)."""
    impl, symmetric = CASES[name]
    loss_fn = loss_function(impl, concrete_backend(backend), temperature, symmetric)
    return lambda: forward_backward(loss_fn, query, key)


def case_steps(names, query, key, backend="auto", temperature=TEMPERATURE):
    """{name: step} for several cases on the SAME inputs (for interleaved timing)."""
    return {name: case_step(name, query, key, backend, temperature) for name in names}


def case_memory_args(name, n, dim, backend="auto", temperature=TEMPERATURE, seed=0):
    """Positional arguments of fastcontrast.cli.demo.make_step for case ``name`` (the memory
    probe rebuilds the inputs from the seed in a fresh process)."""
    impl, symmetric = CASES[name]
    return (impl, n, dim, concrete_backend(backend), temperature, symmetric, seed)


def info_nce_flop(n, m, dim):
    """The essential work of InfoNCE forward+backward: 3 products of the N x M x D shape
    (scores, dQ, dK), 2 FLOP per multiply-add (docs/design.md section 8)."""
    return 6 * n * m * dim
