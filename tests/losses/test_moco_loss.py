"""moco_loss (MoCo's loss over a queue of negatives, same-instance entries masked by stored
indices): every fused backend against the float64 reference (values and gradients, temperature
included), the reference against MoCo's published concatenated logits, a real wrapped-around
NegativeQueue, the MoCoLoss module and bad input. The queue and the momentum update themselves:
tests/moco/. The properties every loss shares: tests/losses/contract/."""
import pytest
import torch
import torch.nn.functional as F

import fastcontrast
from fastcontrast.reference import info_nce_reference

from .._helpers import FUSED_BACKENDS, backend_usable, device_for
from ._cases import (ALL_BACKENDS, DTYPES, D, check_against_reference, leaf, q_k, queue_of,
                     raises_clear_error, skip_unsupported)


class _QueueLike:
    """The part of NegativeQueue's interface that moco_loss uses."""

    def __init__(self, keys, indices=None):
        self.keys, self.indices = keys, indices

    def negatives(self):
        return self.keys

    def stored_indices(self):
        return self.indices


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_ids", [False, True], ids=["queue", "queue+ids"])
@pytest.mark.parametrize(
    "shape", [(1, 5, 3), (8, 70, 64), (37, 300, 128)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_moco_loss_matches_reference(backend, shape, with_ids, dtype):
    n, k, d = shape
    skip_unsupported(backend, dtype, max(n, 64) * d)
    device = device_for(backend)
    query = leaf(n, d, dtype=dtype, device=device)
    key = torch.randn(n, d, dtype=torch.float64).to(dtype=dtype, device=device)  # no grad (MoCo)
    queue_keys = torch.randn(k, d, dtype=torch.float64).to(dtype=dtype, device=device)
    index = torch.randint(0, 2 * n, (n,), device=device) if with_ids else None
    stored = torch.randint(-1, 2 * n, (k,), device=device) if with_ids else None
    queue = _QueueLike(queue_keys, stored)

    def reference(q, t):
        return info_nce_reference(
            q,
            key.to(q.dtype),
            queue_keys.to(q.dtype),
            temperature=t,
            in_batch_negatives=False,
            query_ids=index,
            negative_ids=stored,
        )

    tau = torch.tensor(0.07, dtype=torch.float64, device=device, requires_grad=True)
    check_against_reference(
        backend,
        dtype,
        lambda q, t, backend: fastcontrast.moco_loss(
            q, key, queue, temperature=t, query_index=index, backend=backend
        ),
        reference,
        [query, tau],
        max_logit=1 / 0.07,
    )


def test_moco_loss_is_classic_concat_logits():
    """MoCo's published loss: logits [l_pos, l_neg] / tau, cross-entropy with label 0."""
    q, k = (F.normalize(torch.randn(6, 8, dtype=torch.float64), dim=1) for _ in range(2))
    queue = F.normalize(torch.randn(50, 8, dtype=torch.float64), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.07
    expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.int64))
    for backend in ("torch", "cpu", "reference"):
        if backend_usable(backend):
            got = fastcontrast.moco_loss(q, k, queue, backend=backend)
            assert abs(float(got - expected)) < 1e-10, backend


def test_moco_same_instance_negatives_are_excluded():
    """A queue entry stored with the query's index is not a negative: identical to dropping it."""
    q, k = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    keys = torch.randn(6, 4, dtype=torch.float64)
    stored = torch.tensor([5, 0, 7, 1, -1, 0])  # query 0 has entries 1 and 5, query 1 entry 3
    index = torch.tensor([0, 1, 2])
    got = fastcontrast.moco_loss(
        q, k, _QueueLike(keys, stored), query_index=index, reduction="none", backend="torch"
    )
    for i, drop in enumerate([[1, 5], [3], []]):
        keep = [j for j in range(6) if j not in drop]
        expected = fastcontrast.moco_loss(
            q[i : i + 1], k[i : i + 1], keys[keep], backend="reference"
        )
        assert abs(float(got[i] - expected)) < 1e-12


def test_moco_loss_with_a_real_negative_queue():
    """The filled part of a NegativeQueue (wrapped around, stored indices) as the negatives."""
    queue = fastcontrast.NegativeQueue(10, 4, dtype=torch.float64, store_indices=True)
    for start in range(0, 14, 3):  # 14 keys through a queue of 10: wraps around
        queue.enqueue(
            torch.randn(3, 4, dtype=torch.float64), indices=torch.arange(start, start + 3)
        )
    q = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(5, 4, dtype=torch.float64)
    index = torch.tensor([14, 3, 13, 7, 100])
    got = fastcontrast.moco_loss(q, k, queue, query_index=index, reduction="none", backend="torch")
    expected = info_nce_reference(
        q,
        k,
        queue.negatives(),
        in_batch_negatives=False,
        query_ids=index,
        negative_ids=queue.stored_indices(),
        reduction="none",
    )
    assert torch.allclose(got, expected, atol=1e-12)
    with pytest.raises(ValueError, match="store_indices"):
        fastcontrast.moco_loss(
            q, k, fastcontrast.NegativeQueue(4, 4, dtype=torch.float64), query_index=index
        )


def test_module_equals_functional():
    q, k, queue = torch.randn(3, 4), torch.randn(3, 4), torch.randn(9, 4)
    assert torch.allclose(
        fastcontrast.MoCoLoss(hcl_beta=0.5)(q, k, queue),
        fastcontrast.moco_loss(q, k, queue, hcl_beta=0.5),
    )


# ---------------------------------------------------------------------------------------------
# Bad input


def _filled_queue(size, dim):
    queue = fastcontrast.NegativeQueue(size, dim)
    queue.enqueue(torch.randn(size, dim))
    return queue


BAD_CALLS = {
    "moco_queue_wrong_dim": (lambda: fastcontrast.moco_loss(*q_k(), torch.randn(7, D + 1)),
                             ValueError, r"^queue must have feature dimension D = 4 \(from "
                                         r"query\), got shape \(7, 5\)$"),
    "moco_negative_queue_wrong_dim": (lambda: fastcontrast.MoCoLoss()(
        *q_k(), _filled_queue(7, D + 1)), ValueError,
        r"^queue must have feature dimension D = 4 \(from query\), got shape \(7, 5\)$"),
    "moco_index_plain_queue": (
        lambda: fastcontrast.moco_loss(
            torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 3), query_index=torch.arange(4)
        ),
        ValueError,
        "NegativeQueue",
    ),
    "moco_queue_dim": (
        lambda: fastcontrast.moco_loss(torch.randn(4, 3), torch.randn(4, 3), torch.randn(6, 5)),
        ValueError,
        "feature dimension",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_clear_error(name):
    raises_clear_error(BAD_CALLS[name])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_moco_query_index_dtype_error_names_query_index(backend):
    device = device_for(backend)
    q, k = (leaf(3, 4, dtype=torch.float32, device=device) for _ in range(2))
    queue = queue_of(torch.randn(4, 4, device=device), torch.arange(4, device=device))
    with pytest.raises(TypeError, match="query_index") as error:
        fastcontrast.moco_loss(q, k, queue, query_index=torch.arange(3, dtype=torch.int32,
                                                                     device=device),
                               backend=backend)
    assert "query_ids" not in str(error.value)


@pytest.mark.parametrize("as_module", [False, True], ids=["tensor", "NegativeQueue"])
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_moco_half_queue_error_names_queue(backend, as_module):
    device = device_for(backend)
    q, k = (leaf(3, 4, dtype=torch.float32, device=device) for _ in range(2))
    queue = torch.randn(5, 4, dtype=torch.float16, device=device)
    if as_module:
        queue = queue_of(queue, torch.arange(5, device=device))
    with pytest.raises(TypeError, match=r"^queue\b") as error:
        fastcontrast.moco_loss(q, k, queue, backend=backend)
    assert "negatives" not in str(error.value)
