"""torch.compile, torch.library and the meta device.

- every public loss, inside a small module, compiles with torch.compile(fullgraph=True) on CPU
  (inductor), with zero graph breaks (torch._dynamo.explain), and matches eager in value and
  gradient on the cpu and torch backends;
- torch.library.opcheck passes for every registered op of the fastcontrast namespace;
- every public loss runs on meta tensors (the ops' fake kernels), forward and backward.
"""
import pytest
import torch
from torch import nn

import fastcontrast as fc
from fastcontrast import backends

from .._cases import require_every_loss
from .test_opcheck_objectives import OBJECTIVE_OPS

BACKENDS = [b for b in ("cpu", "torch") if b in backends.available_backends("cpu")]
DTYPE = torch.float64  # compiled host code may reorder float ops: compare in float64
N, M, K, D = 9, 13, 11, 7


def _features(*shape, requires_grad=True):
    return torch.randn(*shape, dtype=DTYPE, requires_grad=requires_grad)


class LossCase(nn.Module):
    """One public loss with learnable scalars, called as the user would."""

    def __init__(self, call, *scalars):
        super().__init__()
        self.call = call
        self.scalars = nn.ParameterList(
            [nn.Parameter(torch.tensor(v, dtype=DTYPE)) for v in scalars])

    def forward(self, *inputs):
        return self.call(*inputs, *self.scalars)


def _targets(n, m):
    return torch.randint(0, m, (n,))


def _derangement(n):
    """targets[i] != i (exclude_self)."""
    return (torch.arange(n) + 1 + torch.randint(0, n - 1, (n,))) % n


# name -> (loss(*inputs, *scalars, backend=...), inputs factory, initial scalars)
CASES = {
    "info_nce": (lambda q, k, t, b: fc.info_nce(q, k, temperature=t, backend=b),
                 lambda: (_features(N, D), _features(N, D)), (0.1,)),
    "info_nce_bank_none": (
        lambda q, k, u, t, b: fc.info_nce(q, k, u, temperature=t, reduction="none", backend=b),
        lambda: (_features(N, D), _features(N, D), _features(K, D)), (0.2,)),
    "info_nce_per_query_sum": (
        lambda q, k, u, t, b: fc.info_nce(q, k, u, temperature=t, reduction="sum", backend=b),
        lambda: (_features(N, D), _features(N, D), _features(N, 3, D)), (0.3,)),
    "info_nce_targets": (
        lambda q, k, y, t, b: fc.info_nce(q, k, temperature=t, targets=y, backend=b),
        lambda: (_features(N, D), _features(M, D), _targets(N, M)), (0.07,)),
    "info_nce_exclude_self": (
        lambda z, y, t, b: fc.info_nce(z, z, temperature=t, targets=y, exclude_self=True,
                                       backend=b),
        lambda: (_features(N, D), _derangement(N)), (0.5,)),
    "info_nce_symmetric": (
        lambda q, k, t, b: fc.info_nce(q, k, temperature=t, symmetric=True, backend=b),
        lambda: (_features(N, D), _features(N, D)), (0.1,)),
    "info_nce_queue_only_unnormalized": (
        lambda q, k, u, t, b: fc.info_nce(q, k, u, temperature=t, in_batch_negatives=False,
                                          normalize=False, backend=b),
        lambda: (_features(N, D), _features(N, D), _features(K, D)), (2.0,)),
    "info_nce_ids": (
        lambda q, k, u, qi, ui, t, b: fc.info_nce(q, k, u, temperature=t, query_ids=qi,
                                                  negative_ids=ui, in_batch_negatives=False,
                                                  backend=b),
        lambda: (_features(N, D), _features(N, D), _features(K, D), torch.randint(0, 4, (N,)),
                 torch.randint(-1, 4, (K,))), (0.2,)),
    "info_nce_dcl": (lambda q, k, t, b: fc.info_nce(q, k, temperature=t, decoupled=True, backend=b),
            lambda: (_features(N, D), _features(N, D)), (0.2,)),
    "nt_xent_dclw": (lambda z1, z2, t, b: fc.nt_xent(z1, z2, temperature=t, decoupled=True,
                                             dclw_sigma=0.5, backend=b),
             lambda: (_features(N, D), _features(N, D)), (0.2,)),
    "nt_xent_hcl": (lambda z1, z2, t, b: fc.nt_xent(z1, z2, temperature=t, hcl_beta=1.0,
                                            hcl_tau_plus=0.1, backend=b),
            lambda: (_features(N, D), _features(N, D)), (0.5,)),
    "nt_xent": (lambda z1, z2, t, b: fc.nt_xent(z1, z2, temperature=t, backend=b),
                lambda: (_features(N, D), _features(N, D)), (0.5,)),
    "supcon": (lambda z, y, t, b: fc.supcon(z, y, temperature=t, backend=b),
               lambda: (_features(N, D), torch.randint(0, 3, (N,))), (0.1,)),
    "supcon_views_none": (
        lambda z, t, b: fc.supcon(z, temperature=t, reduction="none", backend=b),
        lambda: (_features(N, 2, D),), (0.1,)),
    "moco_loss": (lambda q, k, u, t, b: fc.moco_loss(q, k, u, temperature=t, backend=b),
             lambda: (_features(N, D), _features(N, D), _features(K, D, requires_grad=False)),
             (0.07,)),
    "moco_loss_hcl": (lambda q, k, u, t, b: fc.moco_loss(q, k, u, temperature=t, hcl_beta=0.5,
                                                    backend=b),
                 lambda: (_features(N, D), _features(N, D), _features(K, D)), (0.2,)),
    "clip_loss": (lambda x, y, s, c, b: fc.clip_loss(x, y, s, logit_bias=c, backend=b),
             lambda: (_features(N, D), _features(N, D)), (14.0, -2.0)),
    "siglip_loss": (lambda x, y, s, c, b: fc.siglip_loss(x, y, s, c, backend=b),
               lambda: (_features(N, D), _features(N, D)), (10.0, -10.0)),
    "siglip_loss_none": (lambda x, y, s, c, b: fc.siglip_loss(x, y, s, c, reduction="none",
                                                         backend=b),
                    lambda: (_features(N, D), _features(N, D)), (3.0, 1.0)),
}
CASES["distill_info_nce"] = (
    lambda q, k, t, b: fc.distill_info_nce(q, k, k.detach(), q.detach(), temperature=t,
                                           teacher_temperature=0.1, backend=b),
    lambda: (_features(N, D), _features(N, D)), (0.2,))
CASES["distill_clip_loss"] = (
    lambda x, y, s, b: sum(fc.distill_clip_loss(x, y, y.detach(), x.detach(), s, 20.0,
                                                backend=b)),
    lambda: (_features(N, D), _features(N, D)), (10.0,))
require_every_loss(CASES, "torch.compile")


def _module(name, backend):
    call, make_inputs, scalars = CASES[name]
    module = LossCase(lambda *args: call(*args, backend), *scalars)
    return module, make_inputs()


def _loss_and_grads(module, inputs):
    loss = module(*inputs)
    weight = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)
    wrt = [t for t in inputs if t.requires_grad] + list(module.parameters())
    return loss.detach(), torch.autograd.grad((loss * weight).sum(), wrt)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_loss_has_no_graph_break_and_matches_eager(name, backend):
    module, inputs = _module(name, backend)
    explained = torch._dynamo.explain(module)(*inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    torch._dynamo.reset()
    eager_loss, eager_grads = _loss_and_grads(module, inputs)
    compiled = torch.compile(module, fullgraph=True)
    loss, grads = _loss_and_grads(compiled, inputs)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-10, atol=1e-10)
    assert len(grads) == len(eager_grads)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", sorted(CASES))
def test_meta_tensors_run_forward_and_backward(name):
    module, inputs = _module(name, "auto")
    eager_loss = module(*inputs)
    meta_module = module.to("meta")
    meta_inputs = [t.detach().to("meta").requires_grad_(t.requires_grad) for t in inputs]
    loss = meta_module(*meta_inputs)
    assert loss.device.type == "meta"
    assert loss.shape == eager_loss.shape and loss.dtype == eager_loss.dtype
    wrt = [t for t in meta_inputs if t.requires_grad] + list(meta_module.parameters())
    grads = torch.autograd.grad(loss.sum(), wrt)
    for g, t in zip(grads, wrt):
        assert g.device.type == "meta" and g.shape == t.shape and g.dtype == t.dtype


# ---------------------------------------------------------------------------------------------
# opcheck of the registered ops, on every backend that runs here


def _lse_problem(backend, n=7, m=10, d=5):
    dtype = torch.float64 if backend != "triton" else torch.float32
    q, keys = torch.randn(n, d, dtype=dtype), torch.randn(m, d, dtype=dtype)
    acc = torch.float32 if backend == "triton" else dtype
    alpha = torch.rand(n, dtype=acc) + 0.5
    beta = torch.rand(m, dtype=acc) + 0.5
    row_ids, col_ids = torch.randint(-1, 3, (n,)), torch.randint(-1, 3, (m,))
    return q, keys, alpha, beta, row_ids, col_ids


def _op_samples(backend):
    ops = torch.ops.fastcontrast
    q, keys, alpha, beta, row_ids, col_ids = _lse_problem(backend)
    n, m = q.shape[0], keys.shape[0]
    lse_dtype = alpha.dtype
    row_lse, col_lse = ops.masked_lse_forward(q, keys, alpha, beta, row_ids, col_ids, True, 1,
                                              True, backend)
    row_grad, col_grad = torch.rand(n, dtype=lse_dtype), torch.rand(m, dtype=lse_dtype)
    samples = [
        (ops.masked_lse_forward, (q, keys, alpha, beta, None, None, False, 0, False, backend)),
        (ops.masked_lse_forward, (q, keys, alpha, beta, row_ids, col_ids, True, -2, True,
                                  backend)),
        (ops.masked_lse_backward, (q, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad,
                                   row_ids, col_ids, True, 1, True, True, backend)),
        (ops.masked_lse_backward, (q, keys, alpha, beta, row_lse, row_grad, None, None, None,
                                   None, False, 0, False, True, backend)),
    ]
    if backends.PROPERTIES[backend].fuses_gradient:
        samples.append((ops.masked_lse_forward_with_grad,
                        (q, keys, alpha, beta, row_grad, row_ids, col_ids,
                         torch.randn(n, dtype=lse_dtype), True, 0, True, True, backend)))
    x, y = q, keys[:n] if keys.shape[0] >= n else keys
    y = torch.randn_like(x)
    scale, bias = torch.tensor(3.0, dtype=lse_dtype), torch.tensor(-1.0, dtype=lse_dtype)
    grad = torch.rand(n, dtype=lse_dtype)
    samples += [
        (ops.siglip_forward, (x, y, scale, bias, backend)),
        (ops.siglip_backward, (x, y, scale, bias, grad, True, True, backend)),
        (ops.siglip_backward, (x, y, scale, bias, grad, False, True, backend)),
    ]
    if backends.PROPERTIES[backend].fuses_gradient:
        samples.append((ops.siglip_forward_with_grad, (x, y, scale, bias, grad, True, False,
                                                       backend)))
    return samples


@pytest.mark.parametrize("backend", backends.available_backends("cpu")[1:])  # not "reference"
def test_opcheck_loss_ops(backend):
    for op, args in _op_samples(backend):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", backends.available_backends("cpu", family="queue"))
def test_opcheck_queue_enqueue(backend):
    size, d = 8, 3
    for batch, pointer, count in ((3, 6, 6), (11, 2, 8)):
        args = (torch.zeros(size, d), torch.randn(batch, d, dtype=torch.float64), pointer, count,
                torch.tensor(pointer), torch.tensor(count), torch.full((size,), -1),
                torch.arange(batch), None, None, backend)
        torch.library.opcheck(torch.ops.fastcontrast.queue_enqueue_.default, args)


@pytest.mark.parametrize("backend", backends.available_backends("cpu", family="momentum"))
def test_opcheck_momentum_lerp(backend):
    targets = [torch.randn(5, 3), torch.randn(17)]
    onlines = [torch.randn(5, 3), torch.randn(17)]
    torch.library.opcheck(torch.ops.fastcontrast.momentum_lerp_.default,
                          (targets, onlines, 0.25, backend))


def test_every_registered_op_is_opchecked():
    """The namespace holds exactly the ops the opcheck tests above exercise."""
    registered = {name for name in dir(torch.ops.fastcontrast) if not name.startswith("_")}
    checked = {"masked_lse_forward", "masked_lse_backward", "masked_lse_forward_with_grad",
               "siglip_forward", "siglip_backward", "siglip_forward_with_grad",
               "queue_enqueue_", "momentum_lerp_",
               "gram_lse_forward", "gram_lse_backward"}  # tests/kernels/test_gram_kernels.py
    checked |= OBJECTIVE_OPS  # tests/losses/contract/test_opcheck_objectives.py
    assert checked <= registered
    assert not {n for n in registered - checked if not n.startswith("_") and
                callable(getattr(torch.ops.fastcontrast, n, None))
                and hasattr(getattr(torch.ops.fastcontrast, n), "default")}, registered - checked


def test_func_grad_matches_autograd():
    q, k = _features(N, D, requires_grad=False), _features(N, D, requires_grad=False)
    grad_q = torch.func.grad(lambda x: fc.info_nce(x, k, temperature=0.2))(q)
    q.requires_grad_()
    expected, = torch.autograd.grad(fc.info_nce(q, k, temperature=0.2, backend="reference"), q)
    torch.testing.assert_close(grad_q, expected, rtol=1e-10, atol=1e-12)
