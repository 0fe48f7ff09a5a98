"""gather_distributed of fastcontrast.compat.lightly on 2 gloo processes (127.0.0.1) against
lightly's own gathered losses on the same shards, in float64: each rank's loss and the gradients
of its inputs (both follow the convention "the gradient of the sum of all ranks' losses"), and
NTXentLoss's memory bank, filled with every rank's keys, over steps that wrap it.

The workers always exit (fastcontrast.methods.launch.spawn): every collective has a TIMEOUT_S
timeout, a rank's error is raised here with its traceback, and processes still alive at the
deadline are killed."""
import functools
import importlib

import pytest
import torch
import torch.distributed as dist

from fastcontrast.cli.bench import benchmarks_package
from fastcontrast.compat import lightly as compat
from fastcontrast.methods.launch import spawn

benchmarks_package()
from fastcontrast.benchmarks import peers  # noqa: E402

WORLD, ROWS, DIM = 2, 3, 5
TIMEOUT_S = 30
DEADLINE_S = 120


def _lightly_modules():
    ntx, reason = peers.load_peer("lightly")
    if ntx is None:
        return None, reason
    return (importlib.import_module("lightly.loss.dcl_loss"),
            importlib.import_module(ntx.__module__)), None


def _max_error(ours, theirs):
    return max(float((x - y).abs().max()) for x, y in zip(ours, theirs))


def _local_step(loss_fn, out0, out1, rank):
    """(loss, grad out0, grad out1) of this rank's shard of the global views."""
    shard = slice(rank * ROWS, (rank + 1) * ROWS)
    a, b = (t[shard].clone().requires_grad_() for t in (out0, out1))
    loss = loss_fn(a, b)
    return (loss.detach(), *torch.autograd.grad(loss, (a, b)))


def _compare(rank):
    (dcl, ntx), _ = _lightly_modules()
    errors = {}
    torch.manual_seed(0)  # the same global batch on every rank
    out0, out1 = (torch.randn(WORLD * ROWS, DIM, dtype=torch.float64) for _ in range(2))
    weights = functools.partial(dcl.negative_mises_fisher_weights, sigma=0.4)
    cases = {
        "NTXentLoss": (compat.NTXentLoss(0.3, gather_distributed=True),
                       ntx.NTXentLoss(0.3, gather_distributed=True)),
        "DCLLoss": (compat.DCLLoss(0.2, gather_distributed=True),
                    dcl.DCLLoss(0.2, gather_distributed=True)),
        "DCLLoss weight_fn": (compat.DCLLoss(0.2, weights, gather_distributed=True),
                              dcl.DCLLoss(0.2, weights, gather_distributed=True)),
        "DCLWLoss": (compat.DCLWLoss(0.2, 0.4, gather_distributed=True),
                     dcl.DCLWLoss(0.2, 0.4, gather_distributed=True)),
    }
    for name, (ours, theirs) in cases.items():
        errors[name] = _max_error(_local_step(ours, out0, out1, rank),
                                  _local_step(theirs, out0, out1, rank))
    torch.manual_seed(1)  # both banks start from the same draws
    ours = compat.NTXentLoss(0.3, (10, DIM), gather_distributed=True).double()
    torch.manual_seed(1)
    theirs = ntx.NTXentLoss(0.3, (10, DIM), gather_distributed=True).double()
    torch.manual_seed(2)
    for step in range(4):  # 6 keys a step into 10 slots: lightly's truncating ring
        out0, out1 = (torch.randn(WORLD * ROWS, DIM, dtype=torch.float64) for _ in range(2))
        errors[f"memory bank step {step}"] = _max_error(_local_step(ours, out0, out1, rank),
                                                        _local_step(theirs, out0, out1, rank))
    errors["memory bank contents"] = _max_error([ours.memory_bank.keys],
                                                [theirs.memory_bank.bank])
    return errors


def _worker(rank, world):
    torch.set_num_threads(1)
    return _compare(rank)


def test_gather_distributed_matches_lightly_on_two_processes():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    _, reason = _lightly_modules()
    if reason is not None:
        pytest.skip(reason)
    results = spawn(_worker, WORLD, timeout=DEADLINE_S, collective_timeout_s=TIMEOUT_S)
    for rank, errors in enumerate(results):
        assert len(errors) == 9
        for name, error in errors.items():
            assert error < 1e-12, f"rank {rank} {name}: max error {error:.3e}"
