"""Reductions of per-row losses, and the per-row gradient weights they imply (host code of the
fused op families; the reference implementations use reduce_loss too)."""

__all__ = ["REDUCTIONS", "reduce_loss", "reduction_weights"]

REDUCTIONS = ("mean", "sum", "none")


def reduce_loss(loss, reduction):
    """Per-row losses reduced as ``reduction``: "mean", "sum" or "none" (unchanged)."""
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def reduction_weights(reduction, n, grad_output, dtype, weights=None):
    """g_i = grad_output * d reduce_loss(loss, reduction) / d loss_i for N = ``n`` rows (times
    ``weights`` for a weighted sum); "none": grad_output itself."""
    if reduction == "none":
        return grad_output.to(dtype)
    g = grad_output.to(dtype) / n if reduction == "mean" else grad_output.to(dtype)
    return g.expand(n) if weights is None else g * weights.to(dtype)
