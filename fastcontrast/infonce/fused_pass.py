"""FusedPass: what one call of the fused InfoNCE Function (fastcontrast/infonce/function.py)
computes, and the rules that follow from it (which candidates the product holds, whether the
positive is subtracted or merged, whether the symmetric-Gram ops apply)."""
from dataclasses import dataclass
from typing import Optional

import torch

from .. import backends
from .._config import settings

__all__ = ["FusedPass"]


@dataclass(frozen=True)
class FusedPass:
    """The static options of one fused pass.

    loss_i = lse over the candidates of row i (minus s_{i,t_i} when ``subtract_positive``);
    symmetric: (row_lse_i + col_lse_i) / 2 - s_ii.

    ``in_batch_negatives``: the keys are candidates (else only the bank / per-query negatives and
    the positive); ``exclude_self``: key i is not a candidate of row i; ``exclude_positive``:
    the positive is not a candidate (DCL; masked by ids row_ids = t, col_ids = key index);
    ``subtract_positive=False``: loss_i is lse_i alone (the negatives' log-sum-exp of DCLW / HCL,
    SupCon's denominator). ``kernel_dtype``: the dtype the kernels read when an objective passes
    its low-precision inputs upcast to float32 (function.upcast_inputs); None: the inputs'
    own dtype. ``involutive_targets``: t[t[i]] == i (NT-Xent), so the positive mask is
    symmetric."""

    backend: str
    in_batch_negatives: bool
    exclude_self: bool
    symmetric: bool
    normalize: bool
    reduction: str
    exclude_positive: bool
    subtract_positive: bool
    eps: float
    kernel_dtype: Optional[torch.dtype] = None
    involutive_targets: bool = False

    @property
    def properties(self):
        return backends.PROPERTIES[self.backend]

    @property
    def positive_in_extra(self):
        """The positive is a candidate outside the fused product (no in-batch negatives, not
        DCL): its score is merged into the kernel's log-sum-exp on the host."""
        return not self.in_batch_negatives and not self.exclude_positive

    @property
    def excludes_diagonal(self):
        """Key i is a column of the product only with in-batch negatives."""
        return self.exclude_self and self.in_batch_negatives

    @property
    def uses_positive(self):
        """The loss involves s_{i,t_i} outside the kernel: subtracted, or a candidate merged
        into the log-sum-exp on the host."""
        return self.subtract_positive or self.positive_in_extra

    @property
    def positive_is_candidate(self):
        """loss_i = lse over candidates that include s_{i,t_i}, minus s_{i,t_i}: never below 0."""
        return self.subtract_positive and not self.exclude_positive

    def fuses_gradient(self, needs, has_product):
        """The backend forms the gradient in the forward pass: a reduced, one-directional loss
        over a product, with some input needing a gradient."""
        return (self.properties.fuses_gradient and self.reduction != "none"
                and not self.symmetric and any(needs) and has_product)

    def uses_gram(self, shared_key, bank, per_query, targets):
        """The product is a set against itself with a symmetric mask, for the symmetric-Gram
        ops: one tensor as query and key, key i excluded from row i, no other candidates, and
        the positive mask (DCL) symmetric. The gram setting (fastcontrast/_config.py) off turns
        it off."""
        if not settings().gram:
            return False
        symmetric_mask = not self.exclude_positive or targets is None or self.involutive_targets
        return (shared_key and self.excludes_diagonal and not self.symmetric and bank is None
                and per_query is None and symmetric_mask)
