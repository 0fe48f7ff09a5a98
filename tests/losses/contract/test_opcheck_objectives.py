"""torch.library.opcheck for the ops of the fused objectives (Matryoshka, similarity
distillation, the false-negative filter's count op), with the arguments the public losses pass
them: each loss runs forward and backward under a dispatch mode that records every call into
the fastcontrast namespace, and each recorded call is opchecked (schema, fake kernel, dynamic
shapes) on detached copies of its arguments, as test_compile.py checks the InfoNCE ops: the
losses differentiate these ops through their autograd.Functions or registered formulas, which
the loss tests check against the float64 reference."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastcontrast as fc
from fastcontrast import backends

# The ops checked here (tests/losses/contract/test_compile.py counts them as opchecked).
OBJECTIVE_OPS = {"matryoshka_lse_forward", "matryoshka_lse_backward",
                 "matryoshka_lse_forward_with_grad", "distill_forward", "distill_backward",
                 "distill_forward_with_grad", "masked_lse_dropped"}


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastcontrast":
            self.calls.append((func, *torch.utils._pytree.tree_map_only(
                torch.Tensor, lambda t: t.detach().clone(), (args, kwargs))))
        return func(*args, **kwargs)


def _objective_calls(backend):
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(6, 8, generator=gen), torch.randn(6, 8, generator=gen)
    tq, tk = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    return [
        lambda x, y: fc.info_nce(x, y, matryoshka_dims=(2, 8), backend=backend),
        lambda x, y: fc.info_nce(x, y, matryoshka_dims=(4, 8), reduction="none",
                                 backend=backend),
        lambda x, y: fc.clip_loss(x, y, 5.0, matryoshka_dims=(3, 8), backend=backend),
        lambda x, y: fc.distill_info_nce(x, y, tq, tk, temperature=0.5, teacher_temperature=0.3,
                                         symmetric=False, backend=backend),
        lambda x, y: fc.distill_info_nce(x, y, tq, tk, temperature=0.5, teacher_temperature=0.3,
                                         backend=backend),
        lambda x, y: sum(fc.distill_clip_loss(x, y, tq, tk, 5.0, 3.0, backend=backend)),
        lambda x, y: fc.info_nce(x, y, false_negative_margin=0.1, return_dropped=True,
                                 backend=backend)[0],
    ], (q, k)


@pytest.mark.parametrize("backend", backends.available_backends("cpu")[1:])  # not "reference"
def test_opcheck_objective_ops(backend):
    calls, (q, k) = _objective_calls(backend)
    recorder = _RecordOps()
    for call in calls:
        x, y = q.clone().requires_grad_(), k.clone().requires_grad_()
        with recorder:
            loss = call(x, y)
            loss.sum().backward()
    seen = set()
    for func, args, kwargs in recorder.calls:
        name = func._schema.name.split("::")[1]
        if name in OBJECTIVE_OPS:
            seen.add(name)
            torch.library.opcheck(func, args, kwargs)
    expected = {"matryoshka_lse_forward", "matryoshka_lse_backward", "distill_forward",
                "distill_backward", "masked_lse_dropped"}
    if backends.PROPERTIES[backend].fuses_gradient:
        expected |= {"matryoshka_lse_forward_with_grad", "distill_forward_with_grad"}
    assert expected <= seen, expected - seen


@pytest.mark.parametrize("backend", backends.available_backends("cpu")[1:])  # not "reference"
def test_opcheck_matryoshka_ops_with_their_registered_gradients(backend):
    """The Matryoshka ops carry registered autograd formulas: opchecked with inputs that require
    grad, so that the AOT-dispatch check traces their backward too (the fused op's backward must
    not branch on gradient values while traced)."""
    from fastcontrast.infonce.matryoshka_ops import (matryoshka_lse_forward,
                                                     matryoshka_lse_forward_with_grad)

    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 8, generator=gen), torch.randn(5, 8, generator=gen)
    alpha, beta = torch.rand(2, 6, generator=gen) + 0.5, torch.rand(2, 5, generator=gen) + 0.5
    leaves = [t.requires_grad_() for t in (x, y, alpha, beta)]
    torch.library.opcheck(matryoshka_lse_forward, (*leaves, [0, 4, 8], False, True, backend))
    if backends.PROPERTIES[backend].fuses_gradient:
        row_grad = torch.full((2, 6), 1 / 6)
        torch.library.opcheck(matryoshka_lse_forward_with_grad,
                              (*leaves, [0, 4, 8], row_grad, False, backend))
