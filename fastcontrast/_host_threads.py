"""The host passes of a C++-backend loss on the calling thread alone, the kernels on every thread.

Why: a loss's O((N + M) D) host passes (norms, positive scores, the gradient epilogue, SupCon's
class sums) are ATen ops, each an OpenMP parallel region that ends at a barrier. On a busy CPU
(DataLoader workers, a second job) the OS deschedules one thread of the team and the others
wait at the barrier for the rest of its time slice: beside busy processes, info_nce's host ops
at N = 4096, D = 256 took 605 ms per step instead of 6 ms on the calling thread alone. On a quiet
machine each is a memory-bound pass of a few MB, where one thread costs a few milliseconds per
step. The kernels keep every thread: their entry points restore the thread count for their
duration (csrc/cpu/host_threads.h).

    with serial_host_ops(backend):   # backend "cpu": host ATen ops on this thread only
        ...                          # a kernel call inside still runs on every thread

A no-op for the other backends (the torch backend's passes are the matmuls themselves), under
torch.compile (the compiled graph fuses the host passes), without the extension, and with the
``serial_host_ops`` setting off (FASTCONTRAST_SERIAL_HOST_OPS=0, the baseline of the busy-CPU
benchmark)."""
import contextlib

import torch

from ._config import settings

__all__ = ["serial_host_ops", "serial_host_graph"]


def _extension(backend):
    """The loaded C++ extension when the scope applies, else None."""
    if backend != "cpu" or not settings().serial_host_ops or torch.compiler.is_compiling():
        return None
    from . import _ext

    module = _ext.load_extension()
    return module if module is not None and hasattr(module, "serial_host_begin") else None


@contextlib.contextmanager
def serial_host_ops(backend):
    """ATen ops of this thread run on it alone inside the block when ``backend`` is "cpu"; the C++
    kernels called inside keep the thread count from before (nested blocks: the outer one's)."""
    module = _extension(backend)
    if module is None:
        yield
        return
    entered = module.serial_host_begin()
    try:
        yield
    finally:
        module.serial_host_end(entered)


class _SerialBackward(torch.autograd.Function):
    """fn(*inputs) with its autograd graph built inside forward and differentiated in backward
    under serial_host_ops: autograd runs a graph's backward nodes outside any ``with`` block of
    the forward, so the host ops' gradients (norms, cumulative sums, concatenations) would run
    on every thread, each a parallel region with its barrier."""

    @staticmethod
    def forward(ctx, fn, backend, *inputs):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() if _differentiable(t) else t for t in inputs]
            out = fn(*leaves)
        ctx.backend = backend
        ctx.graph = (out, leaves)  # the inner graph (no tensor saved twice)
        ctx.wanted = [i for i, t in enumerate(inputs) if _differentiable(t)]
        ctx.save_for_backward(out.new_empty(0))  # freed by autograd iff the graph is not retained
        return out.detach()

    @staticmethod
    def backward(ctx, grad_output):
        ctx.saved_tensors  # noqa: B018 - raises on a second backward without retain_graph
        out, leaves = ctx.graph
        grads = [None] * len(leaves)
        if out.requires_grad:
            # The inner graph is kept through this backward, then freed with the outer one's
            # saved tensors (retain_graph, as gradcheck passes, keeps both).
            with serial_host_ops(ctx.backend):
                found = torch.autograd.grad(out, [leaves[i] for i in ctx.wanted], grad_output,
                                            allow_unused=True, retain_graph=True)
            for i, g in zip(ctx.wanted, found):
                grads[i] = g
            torch.autograd.Variable._execution_engine.queue_callback(
                lambda: _release_unless_retained(ctx))
        return (None, None, *grads)


def _release_unless_retained(ctx):
    """At the end of the outer backward: drop the inner graph when autograd has freed the outer
    node's saved tensors (retain_graph False), so its buffers go with them."""
    try:
        ctx.saved_tensors  # noqa: B018
    except RuntimeError:
        ctx.graph = None


def _differentiable(t):
    return isinstance(t, torch.Tensor) and t.requires_grad


def serial_host_graph(fn, backend, *inputs):
    """fn(*inputs) (one tensor), its forward AND backward host ops under serial_host_ops when
    that applies (backend "cpu", grad mode on, an input that needs a gradient, not under
    torch.compile or torch.func); else fn(*inputs) under serial_host_ops. Differentiable once
    (the fused kernels' gradients are first order)."""
    wrap = (_extension(backend) is not None and torch.is_grad_enabled()
            and not torch._C._are_functorch_transforms_active()
            and any(_differentiable(t) for t in inputs))
    if not wrap:
        with serial_host_ops(backend):
            return fn(*inputs)
    with serial_host_ops(backend):
        return _SerialBackward.apply(fn, backend, *inputs)
