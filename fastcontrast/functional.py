"""Public functional API: argument validation, then dispatch to a backend.

    info_nce  loss_i = logsumexp_{j in C(i)} <q_i, k_j>/tau - <q_i, k_{t_i}>/tau   (DESIGN.md 1)
    clip_loss symmetric info_nce with tau = 1 / logit_scale, no normalisation (OpenCLIP ClipLoss)

Backends: "reference" (materialised logits, the oracle), "torch" (chunked, recomputing backward),
"cpu" (C++ kernels in csrc/), "triton" (kernels/), "auto" (triton on CUDA, else cpu if the
extension builds, else torch).
"""
import os

import torch

from . import _validation as check
from ._fused import FusedInfoNCE, InfoNCEConfig
from .reference import info_nce_reference

__all__ = ["info_nce", "clip_loss", "available_backends", "resolve_backend"]


def _triton_ops():
    from .kernels import infonce

    return infonce


def _cpu_ops():
    from . import _ext

    return _ext


def _cpu_available():
    try:
        return _cpu_ops().available()
    except ImportError:
        return False


def _torch_ops():
    from . import _torch_chunked

    return _torch_chunked


def _triton_usable(device):
    if device.type == "cuda":
        try:
            _triton_ops()
            return True
        except ImportError:
            return False
    return os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable()


def _triton_importable():
    try:
        import triton  # noqa: F401

        return True
    except ImportError:
        return False


def available_backends(device="cpu"):
    """The backends that can run on ``device`` in this process."""
    device = torch.device(device)
    names = ["reference", "torch"]
    if device.type == "cpu" and _cpu_available():
        names.append("cpu")
    if _triton_usable(device):
        names.append("triton")
    return names


def resolve_backend(backend, device):
    """The concrete backend name for ``backend`` on ``device`` (raises if it cannot run there)."""
    check.check_choice("backend", backend, check.BACKENDS)
    if backend == "auto":
        if device.type == "cuda" and _triton_usable(device):
            return "triton"
        if device.type == "cpu" and _cpu_available():
            return "cpu"
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if not _cpu_available():
            raise RuntimeError("backend='cpu' needs the C++ extension, which could not be built "
                               "or loaded here (see the warning above); use backend='torch'")
    if backend == "triton" and not _triton_usable(device):
        raise ValueError(f"backend='triton' needs CUDA tensors and triton (or TRITON_INTERPRET=1 "
                         f"for CPU tensors), got tensors on {device}")
    return backend


def _ops(name):
    return {"torch": _torch_ops, "cpu": _cpu_ops, "triton": _triton_ops}[name]()


def _validate_info_nce(query, key, negatives, targets, in_batch_negatives, exclude_self,
                       symmetric, normalize, reduction):
    check.check_tensor("query", query, (2,))
    check.check_tensor("key", key, (2,))
    check.check_same("key", key, "query", query)
    n, d = query.shape
    m = key.shape[0]
    check.check_feature_dim("key", key, d)
    check.check_tensor("negatives", negatives, (2, 3), optional=True)
    if negatives is not None:
        check.check_same("negatives", negatives, "query", query)
        check.check_feature_dim("negatives", negatives, d)
        if negatives.dim() == 3 and negatives.shape[0] != n:
            raise ValueError(f"per-query negatives must have shape (N={n}, K, D={d}), "
                             f"got {tuple(negatives.shape)}")
    for name, value in (("in_batch_negatives", in_batch_negatives), ("exclude_self", exclude_self),
                        ("symmetric", symmetric), ("normalize", normalize)):
        check.check_flag(name, value)
    check.check_choice("reduction", reduction, check.REDUCTIONS)
    check.check_targets(targets, n, m, query.device)
    if targets is None and m != n:
        raise ValueError(f"key must have N = {n} rows (key i is the positive of query i) when "
                         f"targets is None, got M = {m}; pass targets for M != N")
    if exclude_self:
        if m != n:
            raise ValueError(f"exclude_self=True needs query and key to be the same set (M == N), "
                             f"got N = {n}, M = {m}")
        if targets is None:
            raise ValueError("exclude_self=True needs targets: without them the positive of "
                             "query i is key i, which exclude_self removes")
        if bool((targets == torch.arange(n, device=targets.device)).any()):
            raise ValueError("exclude_self=True: targets[i] must differ from i (the positive "
                             "would be excluded)")
    if symmetric:
        if targets is not None or m != n:
            raise ValueError(f"symmetric=True needs N == M and targets=None, got N = {n}, M = {m}, "
                             f"targets {'given' if targets is not None else 'None'}")
        if negatives is not None or not in_batch_negatives or exclude_self:
            raise ValueError("symmetric=True supports neither negatives, in_batch_negatives=False "
                             "nor exclude_self=True")


def _run(query, key, negatives, scale, temperature, *, normalize, targets, in_batch_negatives,
         exclude_self, symmetric, reduction, backend):
    name = resolve_backend(backend, query.device)
    if name == "triton" and query.dtype == torch.float64:
        raise TypeError("backend='triton' computes in float16/bfloat16/float32, got float64 "
                        "inputs; use backend='torch' (or 'cpu') for float64")
    if name == "reference":
        return info_nce_reference(
            query, key, negatives, temperature=temperature, normalize=normalize, targets=targets,
            in_batch_negatives=in_batch_negatives, exclude_self=exclude_self, symmetric=symmetric,
            reduction=reduction)
    bank = negatives if negatives is not None and negatives.dim() == 2 else None
    per_query = negatives if negatives is not None and negatives.dim() == 3 else None
    inputs = (query, key, bank, per_query, scale)
    cfg = InfoNCEConfig(
        in_batch_negatives=in_batch_negatives, exclude_self=exclude_self, symmetric=symmetric,
        normalize=normalize, reduction=reduction,
        grad_enabled=torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in inputs))
    return FusedInfoNCE.apply(_ops(name), cfg, query, key, bank, per_query, scale, targets)


def info_nce(query, key, negatives=None, *, temperature=0.07, normalize=True, targets=None,
             in_batch_negatives=True, exclude_self=False, symmetric=False, reduction="mean",
             backend="auto"):
    """InfoNCE / NT-Xent style contrastive loss, fused (never materialises the N x M logits).

    loss_i = logsumexp_{j in C(i)} s_ij - s_{i, t_i},  s_ij = <q_i, k_j> / temperature
    (q, k, negatives L2-normalised first when ``normalize``). C(i): the M keys (only key t_i when
    ``in_batch_negatives`` is False) minus key i when ``exclude_self``, plus ``negatives``: a
    shared bank (K, D) or per-query negatives (N, K, D). ``targets`` (N,) int64: positive key of
    each query (default i, needs M == N). ``symmetric``: mean of query->key and key->query.
    ``temperature``: float or 0-dim tensor (exact gradient). ``reduction``: mean | sum | none.
    """
    _validate_info_nce(query, key, negatives, targets, in_batch_negatives, exclude_self,
                       symmetric, normalize, reduction)
    tau = check.positive_scalar("temperature", temperature, query.device)
    scale = tau.reciprocal()
    return _run(query, key, negatives, scale, temperature, normalize=normalize, targets=targets,
                in_batch_negatives=in_batch_negatives, exclude_self=exclude_self,
                symmetric=symmetric, reduction=reduction, backend=backend)


def clip_loss(image, text, logit_scale, *, logit_bias=None, reduction="mean", backend="auto"):
    """OpenCLIP's ClipLoss: (CE(image -> text) + CE(text -> image)) / 2 on
    logit_scale * image @ text.T, pair i the positive. Features are used as given (CLIP models
    normalise them). ``logit_bias`` shifts every logit of a softmax equally, so it cancels: it is
    accepted for API compatibility and receives a zero gradient."""
    check.check_tensor("image", image, (2,))
    check.check_tensor("text", text, (2,))
    check.check_same("text", text, "image", image)
    if text.shape != image.shape:
        raise ValueError(f"text must have the shape of image {tuple(image.shape)}, "
                         f"got {tuple(text.shape)}")
    check.check_choice("reduction", reduction, check.REDUCTIONS)
    scale = check.positive_scalar("logit_scale", logit_scale, image.device)
    if logit_bias is not None and not isinstance(logit_bias, (torch.Tensor, float, int)):
        raise TypeError(f"logit_bias must be a float or a tensor, got {type(logit_bias).__name__}")
    loss = _run(image, text, None, scale, scale.reciprocal(), normalize=False, targets=None,
                in_batch_negatives=True, exclude_self=False, symmetric=True, reduction=reduction,
                backend=backend)
    if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
        # Keep logit_bias in the graph (zero gradient) without promoting the loss's dtype.
        loss = loss + (0.0 * logit_bias.sum()).to(loss.dtype)
    return loss

