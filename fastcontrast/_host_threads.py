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

__all__ = ["serial_host_ops"]


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
