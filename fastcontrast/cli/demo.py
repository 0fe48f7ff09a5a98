"""Quick-start demo: fastcontrast's fused InfoNCE against the plain-PyTorch way of writing it.

    python -m fastcontrast demo [--n 4096] [--dim 256] [--repeats 5] [--backend auto]

Both compute, on the same random fp32 inputs, the forward and backward pass of

    loss = mean_i  logsumexp_j s_ij - s_ii,   s_ij = <q_i / |q_i|, k_j / |k_j|> / tau

and the demo prints the loss, the median forward+backward time and the peak extra memory of each.
Plain PyTorch materialises the N x N logits (and their softmax and gradient); fastcontrast keeps
O(N) per-row statistics. This module also defines the baseline and the measured step that the
benchmarks (benchmarks/) reuse, so the demo and the benchmarks compare exactly the same things.
"""
import torch
import torch.nn.functional as F

from ..backends import resolve
from ..functional import info_nce
from . import measure

TEMPERATURE = 0.07

# The two implementations the demo and the benchmarks compare.
FASTCONTRAST = "fastcontrast"
NAIVE = "naive"


def naive_info_nce(query, key, temperature=TEMPERATURE, symmetric=False):
    """The plain-PyTorch baseline: cross-entropy on the materialised (N, N) logits of the
    L2-normalised features, key i the positive of query i; symmetric = mean of both directions."""
    logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / temperature
    labels = torch.arange(query.shape[0], device=query.device)
    if symmetric:
        return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    return F.cross_entropy(logits, labels)


def concrete_backend(requested="auto", device="cpu"):
    """The backend a fastcontrast call runs on for ``requested``: "auto" resolved exactly as
    fastcontrast.info_nce resolves it (never fails: a missing or broken extension means the
    pure-PyTorch backend). Other names are returned unchanged."""
    if requested != "auto":
        return requested
    return resolve("auto", torch.device(device))


def make_inputs(n, dim, seed=0, dtype=torch.float32):
    """(query, key), (n, dim) leaf tensors that require grad; key i is a noisy copy of query i,
    so the loss is that of a half-trained model rather than of unrelated vectors."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(n, dim, generator=gen, dtype=dtype)
    key = query + 1.5 * torch.randn(n, dim, generator=gen, dtype=dtype)
    return query.requires_grad_(), key.requires_grad_()


def loss_function(impl, backend="auto", temperature=TEMPERATURE, symmetric=False):
    """loss(query, key) of ``impl`` (FASTCONTRAST or NAIVE) with the given options."""
    if impl == NAIVE:
        return lambda q, k: naive_info_nce(q, k, temperature, symmetric=symmetric)
    if impl == FASTCONTRAST:
        backend = concrete_backend(backend)
        return lambda q, k: info_nce(q, k, temperature=temperature, symmetric=symmetric,
                                     backend=backend)
    raise ValueError(f"impl must be one of {[FASTCONTRAST, NAIVE]}, got {impl!r}")


def forward_backward(loss_fn, query, key):
    """One training step's worth of loss work: forward, then the gradients of query and key
    (returned fresh, not accumulated into .grad). Returns the loss as a float."""
    loss = loss_fn(query, key)
    torch.autograd.grad(loss, (query, key))
    return loss.item()


def make_step(impl, n, dim, backend="auto", temperature=TEMPERATURE, symmetric=False, seed=0):
    """A zero-argument forward+backward step on fresh inputs (what the memory probe runs in a
    child process; top-level so that it pickles by name)."""
    query, key = make_inputs(n, dim, seed)
    loss_fn = loss_function(impl, backend, temperature, symmetric)
    return lambda: forward_backward(loss_fn, query, key)


def compare(n=4096, dim=256, repeats=5, backend="auto", temperature=TEMPERATURE, memory=True):
    """Both implementations on the same inputs: loss, median forward+backward seconds (runs
    interleaved, after one warm-up run each) and, if ``memory``, the peak extra memory of each
    (measured in a fresh process, fastcontrast.cli.measure.peak_extra_memory)."""
    resolved = concrete_backend(backend)
    query, key = make_inputs(n, dim)
    steps = {}
    for impl in (FASTCONTRAST, NAIVE):
        loss_fn = loss_function(impl, resolved, temperature)
        steps[impl] = lambda loss_fn=loss_fn: forward_backward(loss_fn, query, key)
    losses = {impl: step() for impl, step in steps.items()}  # doubles as the warm-up run
    timings = measure.time_interleaved(steps, repeats, warmup=0)
    memory_results = {impl: None for impl in steps}
    if memory:
        for impl in steps:
            memory_results[impl] = measure.peak_extra_memory(
                make_step, impl, n, dim, resolved, temperature,
                warmup_args=(impl, 64, dim, resolved, temperature))
    medians = {impl: measure.summarize(t)["median_s"] for impl, t in timings.items()}
    extra = {impl: None if r is None else r.extra_bytes for impl, r in memory_results.items()}
    ratio = extra[FASTCONTRAST] / extra[NAIVE] if memory and extra[NAIVE] > 0 else None
    return {"n": n, "dim": dim, "temperature": temperature, "repeats": repeats,
            "backend": resolved, "loss": losses, "median_s": medians,
            "peak_extra_bytes": extra, "speedup": medians[NAIVE] / medians[FASTCONTRAST],
            "memory_ratio": ratio,
            "memory_method": None if not memory else memory_results[FASTCONTRAST].method}


def print_comparison(console, result):
    """The comparison as a rich table plus a one-line verdict."""
    from rich.table import Table

    fmt_bytes, fmt_s = measure.format_bytes, measure.format_seconds
    names = {FASTCONTRAST: f"fastcontrast ({result['backend']})", NAIVE: "plain PyTorch"}
    table = Table(title=f"forward+backward, median of {result['repeats']}")
    table.add_column("implementation")
    for column in ("loss", "time", "peak extra memory"):
        table.add_column(column, justify="right")
    for impl, name in names.items():
        extra = result["peak_extra_bytes"][impl]
        table.add_row(name, f"{result['loss'][impl]:.6f}", fmt_s(result["median_s"][impl]),
                      "-" if extra is None else fmt_bytes(extra))
    speedup, mem_ratio = result["speedup"], result["memory_ratio"]
    table.add_section()
    diff = abs(result["loss"][FASTCONTRAST] - result["loss"][NAIVE])
    table.add_row("ratio", f"|diff| {diff:.1e}",
                  f"{1 / speedup:.2f}x", "-" if mem_ratio is None else f"{100 * mem_ratio:.1f}%")
    console.print(table)
    verdict = f"{speedup:.2f}x faster" if speedup >= 1 else f"{1 / speedup:.2f}x slower"
    verdict = f"fastcontrast is {verdict} than plain PyTorch"
    if mem_ratio is not None:
        verdict += f" and needs {100 * mem_ratio:.1f}% of its extra memory"
    console.print(verdict + ".")
    if result["memory_method"] is not None:
        n, dim = result["n"], result["dim"]
        console.print(f"Memory: peak resident set during one forward+backward minus the resident "
                      f"set before it, each implementation in a fresh process "
                      f"({result['memory_method']}); it includes the two gradients "
                      f"({fmt_bytes(2 * n * dim * 4)}). Plain PyTorch's logits alone take "
                      f"{fmt_bytes(n * n * 4)}.")


def run_demo(n=4096, dim=256, repeats=5, backend="auto", temperature=TEMPERATURE, memory=True,
             console=None):
    """Print the set-up, measure (compare) and print the table; returns compare's numbers."""
    from rich.console import Console

    console = console or Console()
    info = measure.machine_info()
    console.print(f"[bold]fastcontrast demo[/]: InfoNCE, N = M = {n}, D = {dim}, fp32, "
                  f"tau = {temperature}")
    console.print(f"{info['cpu']}, {info['torch_threads']} threads, torch {info['torch']}, "
                  f"backend {backend!r} -> {concrete_backend(backend)!r}")
    if memory:
        console.print("(peak memory is measured in a fresh process per implementation)")
    result = compare(n, dim, repeats, backend, temperature, memory)
    print_comparison(console, result)
    return result
