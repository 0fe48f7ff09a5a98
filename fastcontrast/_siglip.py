"""SigLIP's pairwise sigmoid loss (Zhai et al. 2023; OpenCLIP's SigLipLoss), fused: validation,
dispatch, and the one autograd.Function shared by every fused backend.

    z_ij   = logit_scale * <image_i, text_j> + logit_bias,   y_ij = +1 if i == j else -1
    loss_i = -sum_j log sigmoid(y_ij z_ij) = sum_j softplus(-y_ij z_ij)
    "mean" = sum_i loss_i / N (OpenCLIP's normalisation), "sum" = sum_i loss_i, "none" = loss (N,)

Gradients, with g_i = d(reduced loss) / d loss_i and dz_ij = -g_i y_ij sigmoid(-y_ij z_ij):
    d image_i = scale sum_j dz_ij text_j,   d text_j = scale sum_i dz_ij image_i,
    d scale = sum_ij dz_ij <image_i, text_j> = sum_i <gx_i, image_i>,   d bias = sum_ij dz_ij.

A backend ("ops": fastcontrast._siglip_torch, kernels/siglip.py, the C++ entry points of
csrc/cpu/siglip.cpp through _CpuOps below) implements only
    siglip_forward(x, y, scale, bias) -> loss (N,)
    siglip_backward(x, y, scale, bias, row_grad, need_gx=, need_gy=) -> (gx, gy, dz_total)
    siglip_forward_with_grad (optional): both in one pass, for a reduced loss
with gx_i = sum_j dz_ij y_j, gy_j = sum_i dz_ij x_i (None unless needed) and dz_total =
sum_ij dz_ij (always), never holding an N x M tensor. The forward keeps nothing but the inputs;
the backward recomputes the tiles.
"""
from dataclasses import dataclass

import torch

from . import _validation as check
from .functional import resolve_backend_for
from .reference import reduce_loss, reduction_weights, siglip_loss_reference

__all__ = ["siglip_loss"]

_HOST_CHUNK_ROWS = 4096  # rows per chunk of the O(N D) host reduction for d scale


class _CpuOps:
    """The C++ kernels (csrc/cpu/siglip.cpp) with the backend surface above."""

    SUPPORTED_DTYPES = (torch.float32, torch.float64)

    def __init__(self, module):
        self._module = module

    def siglip_forward(self, x, y, scale, bias):
        return self._module.siglip_forward(x, y, float(scale), float(bias))

    def siglip_backward(self, x, y, scale, bias, row_grad, *, need_gx=True, need_gy=True):
        return self._module.siglip_backward(x, y, float(scale), float(bias), row_grad,
                                            need_gx=need_gx, need_gy=need_gy)

    def siglip_forward_with_grad(self, x, y, scale, bias, row_grad, *, need_gx=True,
                                 need_gy=True):
        return self._module.siglip_forward_with_grad(x, y, float(scale), float(bias), row_grad,
                                                     need_gx=need_gx, need_gy=need_gy)


def _backend_ops(name):
    if name == "torch":
        from . import _siglip_torch

        return _siglip_torch
    if name == "cpu":
        from . import _ext

        return _CpuOps(_ext.load_extension())
    from .kernels import siglip

    return siglip


@dataclass(frozen=True)
class _Config:
    reduction: str
    needs: tuple  # requires-grad of (image, text, logit_scale, logit_bias), grad mode included


def _operands(ops, image, text, scale, bias):
    """Inputs in the backend's compute dtype (float32 for half inputs the backend does not take),
    scale and bias as 0-dim tensors of the accumulation dtype (float64 or float32)."""
    cdt = image.dtype if image.dtype in ops.SUPPORTED_DTYPES else torch.float32
    acc = torch.float64 if cdt == torch.float64 else torch.float32
    return (image.to(cdt).contiguous(), text.to(cdt).contiguous(), scale.detach().to(acc),
            bias.detach().to(acc))


def _input_grads(needs, x, scale, gx, gy, dz_total):
    """(d image, d text, d scale, d bias) from the backend's gx, gy, dz_total (None where not
    needed); d scale = sum_i <gx_i, x_i>, before gx is scaled in place."""
    need_image, need_text, need_scale, need_bias = needs
    acc = scale.dtype
    d_scale = None
    if need_scale:
        d_scale = torch.zeros((), dtype=acc, device=x.device)
        for r0 in range(0, x.shape[0], _HOST_CHUNK_ROWS):  # no (N, D) temporary in acc precision
            r1 = r0 + _HOST_CHUNK_ROWS
            d_scale += torch.einsum("nd,nd->", gx[r0:r1].to(acc), x[r0:r1].to(acc))
    d_image = gx.mul_(scale.to(gx.dtype)) if need_image else None
    d_text = gy.mul_(scale.to(gy.dtype)) if need_text else None
    d_bias = dz_total.to(acc) if need_bias else None
    return [d_image, d_text, d_scale, d_bias]


def _backend_grads(ops, cfg, x, y, scale, bias, g, fused):
    """The four input gradients for per-row weights g: with the loss when ``fused``."""
    need_image, need_text, need_scale, _ = cfg.needs
    # dz_total (d bias) comes with every pass, even one that needs neither gx nor gy.
    kwargs = dict(need_gx=need_image or need_scale, need_gy=need_text)
    if fused:
        loss, gx, gy, dz_total = ops.siglip_forward_with_grad(x, y, scale, bias, g, **kwargs)
    else:
        loss = None
        gx, gy, dz_total = ops.siglip_backward(x, y, scale, bias, g, **kwargs)
    return loss, _input_grads(cfg.needs, x, scale, gx, gy, dz_total)


class FusedSigLIP(torch.autograd.Function):
    """SigLIP loss on a tiled backend; O(N) memory beyond the inputs and gradients.

    Inputs: ops (backend), cfg (_Config), image (N, D), text (N, D), scale and bias (0-dim)."""

    @staticmethod
    def forward(ctx, ops, cfg, image, text, scale, bias):
        x, y, s, b = _operands(ops, image, text, scale, bias)
        n = x.shape[0]
        fused_grads = None
        if hasattr(ops, "siglip_forward_with_grad") and cfg.reduction != "none" and any(cfg.needs):
            # The gradient for grad_output = 1 comes with the loss (no recompute); backward scales it.
            g = reduction_weights(cfg.reduction, n, s.new_tensor(1.0), s.dtype).contiguous()
            loss, fused_grads = _backend_grads(ops, cfg, x, y, s, b, g, fused=True)
        else:
            loss = ops.siglip_forward(x, y, s, b)
        ctx.ops, ctx.cfg = ops, cfg
        ctx.dtypes = [t.dtype for t in (image, text, scale, bias)]
        # Handed out on the first backward; a second one (retain_graph=True) recomputes.
        ctx.fused_grads = fused_grads
        ctx.save_for_backward(image, text, scale, bias)
        return reduce_loss(loss, cfg.reduction).to(image.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.fused_grads is not None:
            grads, ctx.fused_grads = ctx.fused_grads, None
            if not bool(grad_output == 1):
                grads = [None if t is None else t.mul_(grad_output.to(t.dtype)) for t in grads]
        else:
            image, text, scale, bias = ctx.saved_tensors
            x, y, s, b = _operands(ctx.ops, image, text, scale, bias)
            g = reduction_weights(ctx.cfg.reduction, x.shape[0], grad_output, s.dtype).contiguous()
            _, grads = _backend_grads(ctx.ops, ctx.cfg, x, y, s, b, g, fused=False)
        grads = [None if grad is None else grad.to(dtype) for grad, dtype in zip(grads, ctx.dtypes)]
        return (None, None, *grads)


def siglip_loss(image, text, logit_scale, logit_bias, *, reduction="mean", backend="auto"):
    """SigLIP's pairwise sigmoid loss, fused (never materialises the N x N logits).

    loss_i = -sum_j log sigmoid(y_ij z_ij),  z_ij = logit_scale <image_i, text_j> + logit_bias,
    y_ij = +1 if i == j else -1. image, text: (N, D), same dtype and device, used as given (no
    normalisation). logit_scale, logit_bias: finite floats or 0-dim tensors (exact gradients when
    they require grad). reduction: "mean" (total / N, as OpenCLIP), "sum", or "none" ((N,)).
    backend: "auto", "reference", "torch", "cpu", "triton" (float16 / bfloat16 / float32 only).
    """
    check.check_image_text(image, text)
    check.check_choice("reduction", reduction, check.REDUCTIONS)
    scale = check.finite_scalar("logit_scale", logit_scale, image.device)
    bias = check.finite_scalar("logit_bias", logit_bias, image.device)
    name = resolve_backend_for(backend, image)
    if name == "reference":
        return siglip_loss_reference(image, text, scale, bias, reduction=reduction)
    grad_enabled = torch.is_grad_enabled()
    needs = tuple(grad_enabled and t.requires_grad for t in (image, text, scale, bias))
    return FusedSigLIP.apply(_backend_ops(name), _Config(reduction, needs), image, text, scale,
                             bias)
