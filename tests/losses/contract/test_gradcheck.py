"""torch.autograd.gradcheck (float64, finite differences) of every registered loss on the fused
backends that run in float64 on the CPU, scalars included, without nondet_tol: every backward
(retained or not) gives bitwise the same gradient, so a retained graph's second backward doubles
the gradients exactly. Also the DCL / DCLW / HCL objectives and HCL over a bank with ids.
info_nce's own option sets: tests/losses/test_info_nce.py."""
import pytest
import torch

import fastcontrast

from ..._helpers import backend_usable, device_for
from .._cases import ALL_BACKENDS, CASES, FLOAT64_BACKENDS, OBJECTIVES, inputs, run


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", FLOAT64_BACKENDS)
def test_gradcheck_without_nondet_tol(backend, name, reduction):
    """Finite differences in float64, and two backward passes bitwise equal (nondet_tol=0)."""
    features = inputs(name, 4, 3, torch.float64, "cpu")
    scalars = [torch.tensor(s, dtype=torch.float64, requires_grad=True)
               for s in CASES[name].scalars]
    k = len(features)

    def loss(*tensors):
        return run(name, list(tensors[:k]), backend, scalars=tensors[k:], reduction=reduction)

    assert torch.autograd.gradcheck(loss, [*features, *scalars], eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_retain_graph_backward_twice_doubles_exactly(backend, name):
    features = inputs(name, 6, 5, torch.float32, device_for(backend))
    scalars = [torch.tensor(s, requires_grad=True, device=device_for(backend))
               for s in CASES[name].scalars]
    loss = run(name, features, backend, scalars=scalars)
    loss.backward(retain_graph=True)
    first = [t.grad.clone() for t in (*features, *scalars)]
    loss.backward()
    for i, (t, g) in enumerate(zip((*features, *scalars), first)):
        assert torch.equal(t.grad, 2 * g), f"input {i}: {(t.grad - 2 * g).abs().max()}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_gradcheck_loss_family(backend):
    if not backend_usable(backend):
        pytest.skip(f"backend {backend!r} unavailable here")

    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    z1, z2, tau = rnd(4, 3), rnd(4, 3), torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    check = dict(eps=1e-6, atol=1e-7, rtol=1e-5)  # no nondet_tol: backward is deterministic
    for opts in OBJECTIVES.values():
        assert torch.autograd.gradcheck(
            lambda a, b, t: fastcontrast.nt_xent(a, b, temperature=t, backend=backend, **opts),
            (z1, z2, tau),
            **check,
        )
    features, labels = rnd(6, 2, 3), torch.tensor([0, 1, 0, 2, 1, 1])
    assert torch.autograd.gradcheck(
        lambda f, t: fastcontrast.supcon(f, labels, temperature=t, backend=backend),
        (features, tau),
        **check,
    )
    q, k, queue = rnd(3, 4), rnd(3, 4), rnd(7, 4)
    ids = (torch.tensor([0, 1, 2]), torch.tensor([1, -1, 0, 2, 2, 5, 6]))
    assert torch.autograd.gradcheck(
        lambda a, b, c, t: fastcontrast.info_nce(
            a,
            b,
            c,
            temperature=t,
            in_batch_negatives=False,
            query_ids=ids[0],
            negative_ids=ids[1],
            hcl_beta=0.5,
            backend=backend,
        ),
        (q, k, queue, tau),
        **check,
    )

