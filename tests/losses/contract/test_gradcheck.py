"""torch.autograd.gradcheck (float64, finite differences) of the fused backends that run in
float64 on the CPU, over every option set, temperature included."""
import pytest
import torch

import fastcontrast

from ..._helpers import backend_usable

OPTION_SETS = {
    "plain": dict(),
    "grouped_keys": dict(m=9, targets=True),
    "shared_bank": dict(negatives=(3,)),
    "per_query_negatives": dict(negatives=(5, 2)),
    "moco_queue": dict(negatives=(4,), in_batch_negatives=False),
    "exclude_self": dict(exclude_self=True, targets=True),
    "symmetric": dict(symmetric=True),
    "unnormalized": dict(normalize=False),
}


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", list(OPTION_SETS))
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck(backend, name, reduction):
    if not backend_usable(backend):
        pytest.skip(f"backend {backend!r} unavailable here")
    spec = dict(OPTION_SETS[name])
    n, d = 5, 3
    m = spec.pop("m", n)
    dt = torch.float64
    q = torch.randn(n, d, dtype=dt, requires_grad=True)
    k = torch.randn(m, d, dtype=dt, requires_grad=True)
    neg_shape = spec.pop("negatives", None)
    neg = None if neg_shape is None else torch.randn(*neg_shape, d, dtype=dt, requires_grad=True)
    targets = None
    if spec.pop("targets", False):
        targets = torch.randint(0, m, (n,))
        if spec.get("exclude_self"):
            targets = (torch.arange(n) + torch.randint(1, n, (n,))) % n
    tau = torch.tensor(0.5, dtype=dt, requires_grad=True)
    inputs = [t for t in (q, k, neg, tau) if t is not None]

    def loss(*args):
        q_, k_ = args[0], args[1]
        neg_ = args[2] if neg is not None else None
        return fastcontrast.info_nce(q_, k_, neg_, temperature=args[-1], targets=targets,
                                     reduction=reduction, backend=backend, **spec)

    # No nondet_tol: every backward (retained or not) gives bitwise the same gradient.
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
