"""Host code shared by the fused op families (fastcontrast/infonce/, siglip.py): reductions and
the per-row gradient weights they imply, the accumulation dtype, the chunked row-wise dot, the
backward of a row normalisation, and the hand-out of gradients in backward. (The reference
implementations use reduce_loss too.)"""
import torch

__all__ = ["REDUCTIONS", "reduce_loss", "reduction_weights", "accumulate_dtype",
           "non_negative_value",
           "row_chunks", "rowwise_dot", "normalized_copy_backward_", "scaled_fused_gradients",
           "cast_gradients", "or_empty", "requires_grad", "first_order_only", "class_index"]

# Rows per chunk of the O(N * D) host helpers: bounds their temporaries.
HOST_CHUNK_ROWS = 4096

REDUCTIONS = ("mean", "sum", "none")


def reduce_loss(loss, reduction, counted=None):
    """Per-row losses reduced as ``reduction``: "mean", "sum" or "none" (unchanged). ``counted``
    (bool, per row): "mean" over those rows only (0 when there is none)."""
    if reduction == "mean":
        return loss.mean() if counted is None else loss.sum() / counted.sum().clamp_min(1)
    if reduction == "sum":
        return loss.sum()
    return loss


def reduction_weights(reduction, n, grad_output, dtype, weights=None):
    """g_i = grad_output * d reduce_loss(loss, reduction) / d loss_i for N = ``n`` rows (times
    ``weights`` for a weighted sum); "none": grad_output itself (times ``weights``)."""
    if reduction == "none":
        g = grad_output.to(dtype)
        return g if weights is None else g * weights.to(dtype)
    g = grad_output.to(dtype) / n if reduction == "mean" else grad_output.to(dtype)
    return g.expand(n) if weights is None else g * weights.to(dtype)


def non_negative_value(loss):
    """``loss`` with its value clamped at 0 and its gradient unchanged: a log-sum-exp that holds
    the subtracted positive scores (or their mean) is >= 0, but the two are rounded apart, so
    the value can land a few ulp below 0."""
    return loss + (loss.detach().clamp_min(0) - loss.detach())


def accumulate_dtype(dtype):
    """float64 for float64 inputs, else float32 (what the host accumulates in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_chunks(n, rows=HOST_CHUNK_ROWS):
    """(r0, r1) ranges of at most ``rows`` rows covering [0, n): eager host code runs its O(N D)
    passes chunk by chunk so that their temporaries stay small. Under torch.compile one range
    [0, n): a loop over a size would specialise the graph on that size (a recompile per batch
    size), and the compiler fuses the casts and products of one pass without the temporaries."""
    if torch.compiler.is_compiling():
        return [(0, n)]
    return [(r0, min(r0 + rows, n)) for r0 in range(0, n, rows)]


def rowwise_dot(a, b):
    """<a_i, b_i> for (R, D) tensors in the accumulation dtype of ``a``; where either needs a
    cast, in chunks of rows so that no (R, D) temporary is made."""
    acc = accumulate_dtype(a.dtype)
    # Without a cast there is no temporary to bound: one pass (one parallel op, not one per
    # chunk: each waits at a barrier on a busy CPU).
    chunks = [(0, a.shape[0])] if a.dtype == b.dtype == acc else row_chunks(a.shape[0])
    if len(chunks) == 1:
        return torch.einsum("nd,nd->n", a.to(acc), b.to(acc))
    out = torch.empty(a.shape[0], dtype=acc, device=a.device)
    for r0, r1 in chunks:
        out[r0:r1] = torch.einsum("nd,nd->n", a[r0:r1].to(acc), b[r0:r1].to(acc))
    return out


def normalized_copy_backward_(grad, z_hat, inv, eps):
    """Chain rule through z_hat = z * inv, inv = 1 / max(|z|, eps), in place on ``grad`` (R, D),
    given the normalised rows ``z_hat`` (R, D) and ``inv`` (R,):

        dz = inv (grad - z_hat <z_hat, grad>)      (dz = inv grad where the eps clamp is active)"""
    unclamped = (inv < 1.0 / eps).to(inv.dtype)
    coef = rowwise_dot(z_hat, grad) * unclamped
    grad.addcmul_(z_hat.to(grad.dtype), coef.unsqueeze(1).to(grad.dtype), value=-1)
    return grad.mul_(inv.unsqueeze(1).to(grad.dtype))


def _last_use_of_saved():
    """Whether the running backward is the last to read its graph's saved tensors: eager, first
    order, retain_graph=False (the engine then frees a node's saved tensors as soon as the node
    returns). Unknown (outside a backward, under torch.compile or torch.func, an older torch that
    does not tell): False."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if (keep_graph is None or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return False
    return not keep_graph()


def scaled_fused_gradients(fused, needs, grad_output):
    """The gradients a fusing backend formed in the forward pass (for grad_output = 1), scaled by
    the actual grad_output; None where not needed.

    In place on the saved tensors when this backward is their last use: the engine frees its
    saved reference when the node returns, so .grad takes each gradient without a copy (an
    out-of-place product plus that copy are two more (N, D) tensors at the peak). With
    retain_graph=True a later backward reads them again: then out of place, so that it reads
    the gradients for grad_output = 1 (two backwards give exactly twice the gradient)."""
    if _last_use_of_saved():
        return [t.mul_(grad_output.to(t.dtype)) if need else None for t, need in zip(fused, needs)]
    return [t * grad_output.to(t.dtype) if need else None for t, need in zip(fused, needs)]


def cast_gradients(grads, dtypes):
    """Each gradient in the dtype of its input (None stays None)."""
    return [None if grad is None else grad.to(dtype) for grad, dtype in zip(grads, dtypes)]


def or_empty(t, like):
    """``t``, or for an absent optional output a 0-element placeholder (custom ops return
    tensors, never None)."""
    return like.new_empty(0) if t is None else t


def requires_grad(*tensors):
    """Per tensor: whether autograd will want its gradient (grad mode on, None counts False)."""
    enabled = torch.is_grad_enabled()
    return tuple(enabled and t is not None and t.requires_grad for t in tensors)


class _DoubleBackwardUnsupported(torch.autograd.Function):
    """Identity on the first-order gradients whose backward raises: they are exact, but the graph
    of their computation is not recorded, so differentiating them again must not be silent."""

    @staticmethod
    def forward(ctx, backend, *grads):
        ctx.backend = backend
        return tuple(g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(
            f"double backward (a gradient taken with create_graph=True, then differentiated) is "
            f"not supported by the fused backend {ctx.backend!r}: its first-order gradients are "
            f"exact but carry no graph. Use backend='reference' (plain autograd on the "
            f"materialised logits) for higher-order gradients.")


def first_order_only(grads, backend):
    """The input gradients of a fused backward, made to raise if differentiated again.

    Under create_graph=True (grad mode on inside backward) each gradient is returned through
    _DoubleBackwardUnsupported, so a second backward through it raises a RuntimeError naming the
    backend instead of silently returning a first-order result; otherwise unchanged. Under
    torch.func transforms (grad mode is on there in every backward) and torch.compile the
    gradients are returned as they are: nesting torch.func.grad is not guarded."""
    if (not torch.is_grad_enabled() or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return grads
    present = [i for i, g in enumerate(grads) if g is not None]
    if not present:
        return grads
    leaves = [grads[i].detach().requires_grad_() for i in present]
    wrapped = _DoubleBackwardUnsupported.apply(backend, *leaves)
    out = list(grads)
    for i, g in zip(present, wrapped):
        out[i] = g
    return out


def class_index(labels):
    """Dense class ids in [0, N) for int64 labels (N,), with static shapes (traceable): sort,
    then count the label changes. The same labels get the same id."""
    sorted_labels, order = labels.sort()
    starts = torch.ones_like(sorted_labels, dtype=torch.bool)
    starts[1:] = sorted_labels[1:] != sorted_labels[:-1]
    dense = torch.cumsum(starts.to(torch.int64), 0) - 1
    return torch.empty_like(dense).scatter_(0, order, dense)
