"""The SigLIP op family (Zhai et al. 2023; OpenCLIP's SigLipLoss): its registered kernel ops and
its autograd, read top to bottom.

    z_ij   = logit_scale * <image_i, text_j> + logit_bias,   y_ij = +1 if i == j else -1
    loss_i = -sum_j log sigmoid(y_ij z_ij) = sum_j softplus(-y_ij z_ij)
    "mean" = sum_i loss_i / N (OpenCLIP's normalisation), "sum" = sum_i loss_i, "none" = loss (N,)

Gradients, with g_i = d(reduced loss) / d loss_i and dz_ij = -g_i y_ij sigmoid(-y_ij z_ij):
    d image_i = scale sum_j dz_ij text_j,   d text_j = scale sum_i dz_ij image_i,
    d scale = sum_ij dz_ij <image_i, text_j> = sum_i <gx_i, image_i>,   d bias = sum_ij dz_ij.

1. Kernel ops (torch.library, namespace ``fastcontrast``, with fake kernels), run by the backend
   named in the call (kernels/siglip.py, csrc/cpu/siglip.cpp, fastcontrast/_siglip_torch.py):
       siglip_forward(x, y, scale, bias) -> loss (N,)
       siglip_backward(x, y, scale, bias, row_grad) -> (gx, gy, dz_total), recomputing the tiles
       siglip_forward_with_grad -> (loss, gx, gy, dz_total) in one pass (backends that fuse it)
   with gx_i = sum_j dz_ij y_j, gy_j = sum_i dz_ij x_i ((0,) unless needed) and dz_total =
   sum_ij dz_ij (always), never an N x M tensor.
2. ``FusedSigLIP``: the autograd.Function on those ops; O(N) memory beyond the inputs.
"""
from dataclasses import dataclass
from typing import Tuple

import torch
from torch import Tensor

from . import backends
from ._host import (accumulate_dtype, cast_gradients, first_order_only, or_empty, reduce_loss,
                    reduction_weights, requires_grad, rowwise_dot, scaled_fused_gradients)
from ._host_threads import serial_host_ops

__all__ = ["siglip_fused_loss", "siglip_forward", "siglip_backward", "siglip_forward_with_grad"]

# ---------------------------------------------------------------------------------------------
# 1. Kernel ops
# ---------------------------------------------------------------------------------------------


def _kernel_args(backend, x, y, scale, bias):
    """(kernels, x, y, scale, bias) as the backend takes them: the C++ kernels take the scalars
    as numbers (a CPU tensor, so reading it costs nothing), the others as 0-dim tensors."""
    impl = backends.kernels("siglip", backend)
    if backend == "cpu":
        scale, bias = float(scale), float(bias)
    return impl, x.contiguous(), y.contiguous(), scale, bias


@torch.library.custom_op("fastcontrast::siglip_forward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def siglip_forward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, backend: str) -> Tensor:
    """Per-row loss (N,): loss_i = sum_j softplus(-y_ij (scale <x_i, y_j> + bias))."""
    impl, x, y, scale, bias = _kernel_args(backend, x, y, scale, bias)
    return impl.siglip_forward(x, y, scale, bias)


@siglip_forward.register_fake
def _siglip_forward_fake(x, y, scale, bias, backend):
    return x.new_empty(x.shape[0], dtype=backends.PROPERTIES[backend].output_dtype(x.dtype))


@torch.library.custom_op("fastcontrast::siglip_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def siglip_backward(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, row_grad: Tensor,
                    need_gx: bool, need_gy: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(gx (N, D) or (0,), gy (M, D) or (0,), dz_total 0-dim), recomputing the tiles."""
    impl, x, y, scale, bias = _kernel_args(backend, x, y, scale, bias)
    gx, gy, dz_total = impl.siglip_backward(x, y, scale, bias, row_grad.contiguous(),
                                            need_gx=need_gx, need_gy=need_gy)
    return or_empty(gx, dz_total), or_empty(gy, dz_total), dz_total


def _fake_gradients(x, y, need_gx, need_gy, backend):
    dtype = backends.PROPERTIES[backend].output_dtype(x.dtype)
    return (x.new_empty(x.shape if need_gx else (0,), dtype=dtype),
            x.new_empty(y.shape if need_gy else (0,), dtype=dtype), x.new_empty((), dtype=dtype))


@siglip_backward.register_fake
def _siglip_backward_fake(x, y, scale, bias, row_grad, need_gx, need_gy, backend):
    return _fake_gradients(x, y, need_gx, need_gy, backend)


@torch.library.custom_op("fastcontrast::siglip_forward_with_grad", mutates_args=(),
                         device_types=("cpu", "cuda"))
def siglip_forward_with_grad(x: Tensor, y: Tensor, scale: Tensor, bias: Tensor, row_grad: Tensor,
                             need_gx: bool, need_gy: bool,
                             backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, gx, gy, dz_total) in one pass over the tiles, no recompute."""
    impl, x, y, scale, bias = _kernel_args(backend, x, y, scale, bias)
    loss, gx, gy, dz_total = impl.siglip_forward_with_grad(
        x, y, scale, bias, row_grad.contiguous(), need_gx=need_gx, need_gy=need_gy)
    return loss, or_empty(gx, loss), or_empty(gy, loss), dz_total


@siglip_forward_with_grad.register_fake
def _siglip_forward_with_grad_fake(x, y, scale, bias, row_grad, need_gx, need_gy, backend):
    dtype = backends.PROPERTIES[backend].output_dtype(x.dtype)
    return (x.new_empty(x.shape[0], dtype=dtype),
            *_fake_gradients(x, y, need_gx, need_gy, backend))


# ---------------------------------------------------------------------------------------------
# 2. The autograd.Function
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    backend: str
    reduction: str
    needs: tuple  # requires-grad of (image, text, logit_scale, logit_bias), grad mode included

    @property
    def fused(self):
        """The backend forms the gradient in the forward pass (a reduced loss)."""
        return (backends.PROPERTIES[self.backend].fuses_gradient and self.reduction != "none"
                and any(self.needs))


def _operands(backend, image, text, scale, bias):
    """Inputs in the backend's compute dtype (float32 for half inputs the backend does not take),
    scale and bias as 0-dim tensors of the accumulation dtype (float64 or float32)."""
    cdt = backends.PROPERTIES[backend].compute_dtype(image.dtype)
    acc = accumulate_dtype(cdt)
    return (image.to(cdt).contiguous(), text.to(cdt).contiguous(), scale.detach().to(acc),
            bias.detach().to(acc))


def _input_grads(needs, x, scale, gx, gy, dz_total):
    """(d image, d text, d scale, d bias) from the backend's gx, gy, dz_total (None where not
    needed); d scale = sum_i <gx_i, x_i>, before gx is scaled in place."""
    need_image, need_text, need_scale, need_bias = needs
    acc = scale.dtype
    d_scale = rowwise_dot(x, gx).to(acc).sum() if need_scale else None
    d_image = gx.mul_(scale.to(gx.dtype)) if need_image else None
    d_text = gy.mul_(scale.to(gy.dtype)) if need_text else None
    d_bias = dz_total.to(acc) if need_bias else None
    return [d_image, d_text, d_scale, d_bias]


def _backend_grads(spec, x, y, scale, bias, g, fused):
    """(loss or None, the four input gradients) for per-row weights g: with the loss when
    ``fused``."""
    need_image, need_text, need_scale, _ = spec.needs
    # dz_total (d bias) comes with every pass, even one that needs neither gx nor gy.
    need_gx, need_gy = need_image or need_scale, need_text
    if fused:
        loss, gx, gy, dz_total = siglip_forward_with_grad(x, y, scale, bias, g, need_gx, need_gy,
                                                          spec.backend)
    else:
        loss = None
        gx, gy, dz_total = siglip_backward(x, y, scale, bias, g, need_gx, need_gy, spec.backend)
    return loss, _input_grads(spec.needs, x, scale, gx, gy, dz_total)


class FusedSigLIP(torch.autograd.Function):
    """SigLIP loss on the kernel ops: apply(image (N, D), text (N, D), scale, bias (0-dim), spec)
    -> (loss, *fused gradients); only the loss is differentiable. A fusing backend returns the
    gradient for grad_output = 1 with the loss and the backward scales it; otherwise the
    backward recomputes the tiles."""

    @staticmethod
    def forward(image, text, scale, bias, spec):
        with serial_host_ops(spec.backend):
            x, y, s, b = _operands(spec.backend, image, text, scale, bias)
            fused = [None] * 4
            if spec.fused:
                g = reduction_weights(spec.reduction, x.shape[0], s.new_tensor(1.0), s.dtype)
                loss, fused = _backend_grads(spec, x, y, s, b, g.contiguous(), fused=True)
            else:
                loss = siglip_forward(x, y, s, b, spec.backend)
            out = reduce_loss(loss, spec.reduction)
        return (out, *[or_empty(t, out) for t in fused])

    @staticmethod
    def setup_context(ctx, inputs, output):
        image, text, scale, bias, spec = inputs
        ctx.spec = spec
        ctx.dtypes = [t.dtype for t in (image, text, scale, bias)]
        ctx.mark_non_differentiable(*output[1:])
        ctx.save_for_backward(image, text, scale, bias, *output[1:])

    @staticmethod
    def backward(ctx, grad_output, *_):
        spec = ctx.spec
        image, text, scale, bias, *fused = ctx.saved_tensors  # version checks: in-place raises
        with torch.no_grad(), serial_host_ops(spec.backend):
            if spec.fused:
                grads = scaled_fused_gradients(fused, spec.needs, grad_output)
            else:
                x, y, s, b = _operands(spec.backend, image, text, scale, bias)
                g = reduction_weights(spec.reduction, x.shape[0], grad_output,
                                      s.dtype).contiguous()
                _, grads = _backend_grads(spec, x, y, s, b, g, fused=False)
            grads = cast_gradients(grads, ctx.dtypes)
        return (*first_order_only(grads, spec.backend), None)


def siglip_fused_loss(image, text, scale, bias, *, reduction, backend):
    """SigLIP's loss on a fused backend (validated inputs; scale and bias 0-dim tensors), in the
    accumulation dtype (float32 for half inputs: the public function casts it)."""
    needs = requires_grad(image, text, scale, bias)
    return FusedSigLIP.apply(image, text, scale, bias, _Spec(backend, reduction, needs))[0]
