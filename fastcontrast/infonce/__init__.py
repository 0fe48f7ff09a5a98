"""The InfoNCE op family (info_nce, clip_loss, nt_xent, supcon, moco_loss, DCL / DCLW / HCL), in
layers, each a module (docs/architecture.md follows one call through them):

    ops.py          the kernel ops (torch.library) and their fakes: the masked log-sum-exp of
                    s_ij = alpha_i beta_j <query_i, keys_j> and its gradient, and the
                    symmetric-Gram ops of a set against itself
    fused_pass.py   FusedPass: what one fused call computes, and the rules that follow from it
    operands.py     the inputs as the kernels see them (prepare), the product (keys, scales,
                    id mask), the host-side scores (the positive, per-query negatives)
    gradients.py    the host gradient maths: every input's gradient from the kernels'
    function.py     FusedInfoNCE, the autograd.Function, and fused_loss, the call objectives make
    objectives.py   InfoNCEOptions and the objectives: InfoNCE, DCL, DCLW, HCL
    supcon.py       SupCon L_out by class sums

Memory is O(N + M) beyond the inputs: no layer forms the N x M scores."""
from .objectives import InfoNCEOptions, info_nce_loss
from .ops import (gram_lse_backward, gram_lse_forward, masked_lse_backward, masked_lse_forward,
                  masked_lse_forward_with_grad)
from .supcon import supcon_loss

__all__ = ["InfoNCEOptions", "info_nce_loss", "supcon_loss", "masked_lse_forward",
           "masked_lse_backward", "masked_lse_forward_with_grad", "gram_lse_forward",
           "gram_lse_backward"]
