"""torch.compile over changing batch sizes: every public loss (functional and module form,
including a learned temperature) compiles to at most 2 graphs for 11 batch sizes with the
default ``dynamic=None`` (the first size static, then one dynamic graph) and to 1 graph with
``dynamic=True``, always with ``fullgraph=True``, and matches eager in value and gradient.

The graphs run on aot_eager, so the backward of each loss is traced with symbolic sizes too, and
are counted as dynamo's unique_graphs: a trace that dynamo restarts internally (it does so once
when a float argument that it had made symbolic gets specialised) leaves one graph.
"""
import pytest
import torch
from torch._dynamo.utils import counters

import fastcontrast as fc
from fastcontrast import backends

from .._cases import require_every_loss

BACKENDS = [b for b in ("cpu", "torch") if b in backends.available_backends("cpu")]
SIZES = (6, 9, 12, 17, 20, 23, 31, 40, 47, 52, 64)
D = 5


def _labels(n):
    return torch.arange(n) % 3


class _WithLabels(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.loss = loss

    def forward(self, x, y):
        return self.loss(x + y, _labels(x.shape[0]))


class _WithQueue(_WithLabels):
    def forward(self, x, y):
        return self.loss(x, y, (x - y).detach())


# name -> (backend -> loss(a, b)); a, b: (N, D) float64 leaves
CASES = {
    "info_nce": lambda b: lambda x, y: fc.info_nce(x, y, temperature=0.1, backend=b),
    "clip_loss": lambda b: lambda x, y: fc.clip_loss(x, y, 14.0, backend=b),
    "nt_xent": lambda b: lambda x, y: fc.nt_xent(x, y, temperature=0.5, backend=b),
    "supcon": lambda b: lambda x, y: fc.supcon(x + y, _labels(x.shape[0]), backend=b),
    "moco_loss": lambda b: lambda x, y: fc.moco_loss(x, y, (x + y).detach(), backend=b),
    "siglip_loss": lambda b: lambda x, y: fc.siglip_loss(x, y, 10.0, -10.0, backend=b),
}
CASES["distill_info_nce"] = lambda b: lambda x, y: fc.distill_info_nce(
    x, y, y.detach(), x.detach(), temperature=0.2, teacher_temperature=0.1, backend=b)
CASES["distill_clip_loss"] = lambda b: lambda x, y: sum(fc.distill_clip_loss(
    x, y, y.detach(), x.detach(), 10.0, 20.0, backend=b))
require_every_loss(CASES, "torch.compile over changing batch sizes")
# The module twins call the functions above: one backend ("auto") suffices for them.
MODULE_CASES = {
    "InfoNCELoss": lambda b: fc.InfoNCELoss(0.1, backend=b),
    "InfoNCELoss_learned": lambda b: fc.InfoNCELoss(0.1, learn_temperature=True, backend=b),
    "NTXentLoss_learned": lambda b: fc.NTXentLoss(0.5, learn_temperature=True, backend=b),
    "SupConLoss": lambda b: _WithLabels(fc.SupConLoss(backend=b)),
    "MoCoLoss": lambda b: _WithQueue(fc.MoCoLoss(backend=b)),
    "ClipLoss": lambda b: fc.ClipLoss(backend=b),
    "SigLIPLoss": lambda b: fc.SigLIPLoss(backend=b),
}


def _step(fn, n, seed):
    """(loss, input gradients, parameter gradients) of one step at batch size n."""
    generator = torch.Generator().manual_seed(seed)
    x, y = (torch.randn(n, D, dtype=torch.float64, generator=generator).requires_grad_()
            for _ in range(2))
    loss = fn(x, y)
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    grads = torch.autograd.grad(loss, [x, y, *params])
    return loss.detach(), grads


GRID = [(name, b) for name in CASES for b in BACKENDS] + [(name, "auto") for name in MODULE_CASES]


@pytest.mark.parametrize("dynamic, max_graphs", [(None, 2), (True, 1)])
@pytest.mark.parametrize("name, backend", GRID)
def test_changing_batch_size_compiles_few_graphs(name, backend, dynamic, max_graphs):
    torch._dynamo.reset()
    fn = {**CASES, **MODULE_CASES}[name](backend)
    if isinstance(fn, torch.nn.Module):
        fn = fn.double()
    counters.clear()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=dynamic)
    for seed, n in enumerate(SIZES):
        loss, grads = _step(compiled, n, seed)
        expected_loss, expected_grads = _step(fn, n, seed)
        torch.testing.assert_close(loss, expected_loss)
        for got, expected in zip(grads, expected_grads):
            torch.testing.assert_close(got, expected)
    graphs = counters["stats"]["unique_graphs"]
    assert 1 <= graphs <= max_graphs, f"{name}: {graphs} graphs for {len(SIZES)} batch sizes"
