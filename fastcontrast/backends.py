"""The backend layer: which implementations exist, where they can run, and which one a call gets.

Every op of fastcontrast (the losses, NegativeQueue.enqueue, momentum_update) resolves its
``backend=`` argument here, and nowhere else:

    name        kernels                                runs on          families
    reference   plain PyTorch, materialised logits     any device       losses (the oracle)
    torch       pure-PyTorch chunks, recompute         any device       losses, queue, momentum
    cpu         C++ (csrc/cpu/, pybind11, OpenMP)      CPU              losses, momentum
    triton      Triton (kernels/)                      CUDA (CPU when   losses, queue, momentum
                                                       TRITON_INTERPRET=1)
    cuda        CUDA C++ (csrc/cuda/)                  CUDA             queue, momentum
    auto        CUDA -> triton (else torch); CPU -> cpu when the C++ extension loads (else
                torch); the queue always takes torch on CPU (a launch there costs nothing)

The kernels themselves are ``torch.library`` custom ops in the ``fastcontrast`` namespace (one
registration per op family, beside its autograd: fastcontrast/infonce/ops.py, siglip.py, queue.py,
momentum.py); each op takes the resolved backend name as a string argument and its per-device
kernel (CPU, CUDA) calls the implementation table ``kernels(family, name)`` below. The static
properties a host function needs from a backend are the fields of ``Backend``.

Resolution runs at trace time under torch.compile (``assume_constant_result``): the resolved
name is a constant of the graph, never a graph break.
"""
import functools
import os
from dataclasses import dataclass

import torch

__all__ = ["BACKENDS", "LOSS_BACKENDS", "Backend", "PROPERTIES", "available_backends", "resolve",
           "kernels"]

BACKENDS = ("auto", "reference", "torch", "cpu", "triton", "cuda")
FAMILIES = {"loss": ("reference", "torch", "cpu", "triton"),
            "queue": ("torch", "triton", "cuda"),
            "momentum": ("torch", "cpu", "triton", "cuda")}
LOSS_BACKENDS = ("auto",) + FAMILIES["loss"]  # the backend= choices of the losses
_FLOAT = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Backend:
    """What host code needs to know of a kernel backend (the backend protocol).

    compute_dtypes: input dtypes the kernels take (other inputs are cast to float32 first);
    float32_outputs: results are float32 whatever the input (else they have the input's dtype);
    prenormalized: the kernels want L2-normalised inputs (alpha = 1/tau, beta = 1) rather than
    the inverse norms folded into alpha / beta; fuses_gradient: has the forward-with-gradient
    kernels (a reduced loss gets its gradient in the forward pass, no recompute)."""

    name: str
    compute_dtypes: tuple
    float32_outputs: bool = False
    prenormalized: bool = False
    fuses_gradient: bool = False

    def compute_dtype(self, dtype):
        """The dtype the kernels compute in for inputs of ``dtype``."""
        return dtype if dtype in self.compute_dtypes else torch.float32

    def output_dtype(self, dtype):
        """The dtype of the kernels' outputs for inputs of ``dtype``."""
        return torch.float32 if self.float32_outputs else self.compute_dtype(dtype)


PROPERTIES = {
    "torch": Backend("torch", _FLOAT),
    "cpu": Backend("cpu", _FLOAT, fuses_gradient=True),
    "triton": Backend("triton", (torch.float16, torch.bfloat16, torch.float32),
                      float32_outputs=True, prenormalized=True),
}


@functools.lru_cache(maxsize=None)
def _cpu_extension_loads():
    from . import _ext

    return _ext.available()


@functools.lru_cache(maxsize=None)
def _cuda_extension_loads():
    from . import _cuda_ext

    return _cuda_ext.available()


@functools.lru_cache(maxsize=None)
def _triton_imports():
    try:
        from . import kernels  # noqa: F401  (fastcontrast.kernels needs triton)

        return True
    except ImportError:
        return False


def _runnable(name, device_type):
    """Whether backend ``name`` can run on tensors of ``device_type`` in this process."""
    if name in ("reference", "torch"):
        return True
    if name == "cpu":
        return device_type == "cpu" and _cpu_extension_loads()
    if name == "triton":
        on_device = device_type == "cuda" or (
            device_type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")
        return on_device and _triton_imports()
    if name == "cuda":
        return device_type == "cuda" and _cuda_extension_loads()
    return False


def _why_not(name, device_type, family="loss"):
    """The error for a backend asked for explicitly that cannot run here."""
    if family == "queue" and name in ("triton", "cuda") and device_type != "cuda":
        extra = " and triton (or TRITON_INTERPRET=1 for the CPU)" if name == "triton" else ""
        return ValueError(f"backend={name!r} needs a queue on a CUDA device{extra}, "
                          f"got {device_type}")
    if name == "cpu" and device_type != "cpu":
        return ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device_type}")
    if name == "cpu":
        return RuntimeError("backend='cpu' needs the C++ extension, which could not be built or "
                            "loaded here (see the warning above); use backend='torch'")
    if name == "triton":
        return ValueError(f"backend='triton' needs CUDA tensors and triton (or TRITON_INTERPRET=1 "
                          f"for CPU tensors), got tensors on {device_type}")
    if device_type != "cuda":
        return ValueError(f"backend='cuda' needs CUDA tensors, got tensors on {device_type}")
    from . import _cuda_ext

    return RuntimeError(f"backend='cuda' is unavailable: {_cuda_ext.unavailable_reason()}")


def _auto(family, device_type):
    if device_type == "cuda":
        return "triton" if _runnable("triton", "cuda") else "torch"
    if device_type == "cpu" and family != "queue" and _runnable("cpu", "cpu"):
        return "cpu"
    return "torch"  # meta tensors (the ops' fake kernels) and other devices


def _resolve_name(backend, device_type, family):
    """The concrete backend (a constant under torch.compile); raises where it cannot run."""
    if backend == "auto":
        return _auto(family, device_type)
    if _runnable(backend, device_type):
        return backend
    raise _why_not(backend, device_type, family)


# What torch.compiler.assume_constant_result(_resolve_name) does (it only sets this attribute,
# torch/_dynamo/decorators.py), without importing torch._dynamo when fastcontrast is imported:
# that import alone took ~1.2 s of every process. tests/losses/test_import_cost.py checks that
# the decorator still sets exactly this.
_resolve_name._dynamo_marked_constant = True


def resolve(backend, device, *, family="loss", dtype=None):
    """The concrete backend name for ``backend`` on ``device`` for an op of ``family`` ("loss",
    "queue", "momentum"); ValueError / RuntimeError where it cannot run there. With ``dtype``,
    a backend that cannot compute in it (triton: float64) is refused with a TypeError."""
    choices = ("auto",) + FAMILIES[family]
    if not isinstance(backend, str) or backend not in choices:
        raise ValueError(f"backend must be one of {', '.join(map(repr, choices))}, got {backend!r}")
    name = _resolve_name(backend, torch.device(device).type, family)
    if dtype is not None and name == "triton" and dtype == torch.float64:
        raise TypeError("backend='triton' computes in float16/bfloat16/float32, got float64 "
                        "inputs; use backend='torch' (or 'cpu') for float64")
    return name


def available_backends(device="cpu", family="loss"):
    """The backends of ``family`` that can run on ``device`` in this process."""
    device_type = torch.device(device).type
    return [name for name in FAMILIES[family] if _runnable(name, device_type)]


def kernels(family, name):
    """The implementation of op family ``family`` ("infonce", "gram" (the symmetric-Gram ops of
    the InfoNCE family), "matryoshka" (its prefix ops), "siglip", "distill", "queue",
    "momentum") in backend ``name``: a module (or the compiled extension) with that family's
    kernel functions."""
    if name == "torch":
        from . import _distill_torch, _siglip_torch, _torch_chunked, _torch_matryoshka

        return {"infonce": _torch_chunked, "gram": _torch_chunked, "siglip": _siglip_torch,
                "matryoshka": _torch_matryoshka, "distill": _distill_torch}[family]
    if name == "cpu":
        from . import _ext

        module = _ext.load_extension()
        if module is None:
            raise _why_not("cpu", "cpu")
        return module
    if name == "cuda":
        from . import _cuda_ext

        return _cuda_ext.require()
    if name == "triton":
        if family == "gram":
            from .kernels import gram

            return gram
        if family == "matryoshka":
            from .kernels import matryoshka

            return matryoshka
        from .kernels import distill, infonce, momentum, queue, siglip

        return {"infonce": infonce, "siglip": siglip, "queue": queue, "momentum": momentum,
                "distill": distill}[family]
    raise ValueError(f"no {family} kernels in backend {name!r}")
