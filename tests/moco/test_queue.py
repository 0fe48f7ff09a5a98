"""NegativeQueue against a row-by-row reference ring buffer: every backend that can run here,
odd sizes (queue size not a multiple of the batch, batch larger than the queue, size 1, D = 3),
dtype casts, views, state_dict round trips, .to(), and bad input."""
import pytest
import torch

from fastcontrast.queue import NegativeQueue, available_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


BACKENDS = available_backends(DEVICE)


class RefQueue:
    """The specification: rows pushed one at a time, in float64."""

    def __init__(self, size, dim):
        self.keys = torch.zeros(size, dim, dtype=torch.float64)
        self.labels = torch.full((size,), -1, dtype=torch.int64)
        self.indices = torch.full((size,), -1, dtype=torch.int64)
        self.pointer, self.count, self.history = 0, 0, []

    def push(self, keys, labels, indices):
        for b in range(keys.shape[0]):
            self.keys[self.pointer] = keys[b].double()
            self.labels[self.pointer] = labels[b]
            self.indices[self.pointer] = indices[b]
            self.history.append(self.pointer)
            self.pointer = (self.pointer + 1) % self.keys.shape[0]
            self.count = min(self.count + 1, self.keys.shape[0])

    def oldest_first(self):
        if self.count < self.keys.shape[0]:
            return torch.arange(self.count)
        return (torch.arange(self.keys.shape[0]) + self.pointer) % self.keys.shape[0]


def _batch(batch, dim, dtype, device, offset=0):
    keys = torch.randn(batch, dim, dtype=torch.float64).to(dtype=dtype, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    indices = torch.arange(offset, offset + batch, device=device)
    return keys, labels, indices


def _assert_matches(queue, ref):
    assert int(queue.pointer) == ref.pointer and int(queue.count) == ref.count
    assert len(queue) == ref.count and queue.is_full == (ref.count == ref.keys.shape[0])
    # Whole buffers, unfilled rows included: a write to a wrong slot cannot hide.
    expected = ref.keys.to(queue.keys.dtype)
    assert torch.equal(queue.keys.cpu(), expected), (queue.keys, expected)
    assert torch.equal(queue.labels.cpu(), ref.labels)
    assert torch.equal(queue.indices.cpu(), ref.indices)
    negatives = queue.negatives()
    assert negatives.shape == (ref.count, ref.keys.shape[1])
    assert negatives.data_ptr() == queue.keys.data_ptr()  # a view, never a copy
    assert torch.equal(queue.stored_labels().cpu(), ref.labels[:ref.count])
    assert torch.equal(queue.stored_indices().cpu(), ref.indices[:ref.count])
    order = ref.oldest_first()
    assert torch.equal(queue.negatives(oldest_first=True).cpu(), expected[order])
    assert torch.equal(queue.stored_indices(oldest_first=True).cpu(), ref.indices[order])


# (size, dim, batch sizes): size not a multiple of the batch, B > size, B = 1, B = size, B = 0,
# a one-row queue, D = 3 and D = 1000.
SCHEDULES = [
    (7, 3, [3, 5, 1, 20, 7, 0, 2]),
    (1, 4, [1, 3, 1]),
    (10, 3, [4, 4, 4, 4]),
    (5, 1000, [2, 4, 9, 1]),
    (64, 16, [64, 63, 130]),
]
# (queue dtype, incoming keys dtype): casts with a single rounding, so the result is exact.
DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.float32, torch.float64),
               (torch.float64, torch.float32), (torch.float16, torch.float32),
               (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size,dim,batches", SCHEDULES)
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS,
                         ids=lambda p: f"{p[0]}<-{p[1]}".replace("torch.", ""))
def test_enqueue_matches_reference(backend, size, dim, batches, dtypes):
    queue_dtype, key_dtype = dtypes
    queue = NegativeQueue(size, dim, dtype=queue_dtype, device=DEVICE, store_labels=True,
                          store_indices=True, backend=backend)
    ref = RefQueue(size, dim)
    seen = 0
    for batch in batches:
        keys, labels, indices = _batch(batch, dim, key_dtype, DEVICE, seen)
        seen += batch
        queue.enqueue(keys, labels, indices)
        ref.push(keys.cpu().to(queue_dtype), labels.cpu(), indices.cpu())
        _assert_matches(queue, ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_enqueue_without_labels_and_with_strided_keys(backend):
    queue = NegativeQueue(6, 3, device=DEVICE, backend=backend)
    base = torch.randn(3, 8, device=DEVICE)
    keys = base.t()[::2]            # (4, 3) with row stride 2 and column stride 8
    queue.enqueue(keys)
    queue.enqueue(keys[:3].contiguous())
    rows = torch.cat([keys, keys[:3]]).cpu()  # 7 rows through 6 slots: row 6 in slot 0
    expected = rows[[6, 1, 2, 3, 4, 5]]
    assert torch.equal(queue.keys.cpu(), expected)
    assert (int(queue.pointer), len(queue)) == (1, 6)


def test_keys_requiring_grad_are_detached():
    queue = NegativeQueue(4, 2)
    keys = torch.randn(3, 2, requires_grad=True)
    queue.enqueue(keys * 2)
    assert not queue.keys.requires_grad and queue.negatives().grad_fn is None
    assert torch.equal(queue.negatives(), (keys * 2).detach())


def test_buffers_are_registered_and_move_with_to():
    queue = NegativeQueue(5, 3, store_labels=True, store_indices=True)
    assert set(dict(queue.named_buffers())) == {"keys", "labels", "indices", "pointer", "count"}
    assert set(queue.state_dict()) == {"keys", "labels", "indices", "pointer", "count"}
    queue.enqueue(torch.randn(3, 3), torch.arange(3), torch.arange(3))
    half = queue.to(torch.float16)
    assert half is queue and queue.keys.dtype == torch.float16
    assert queue.labels.dtype == torch.int64 and queue.pointer.dtype == torch.int64
    assert len(queue) == 3 and queue.negatives().dtype == torch.float16
    if torch.cuda.is_available():
        queue.to("cuda")
        assert all(b.is_cuda for b in queue.buffers())
        queue.enqueue(torch.randn(4, 3, device="cuda"), torch.arange(4, device="cuda"),
                      torch.arange(4, device="cuda"))
        assert (int(queue.pointer), len(queue)) == (2, 5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_of_a_partially_filled_queue(backend):
    size, dim = 9, 3
    source = NegativeQueue(size, dim, device=DEVICE, store_labels=True, backend=backend)
    for batch in (4, 2):  # 6 of 9 rows filled
        keys, labels, _ = _batch(batch, dim, torch.float32, DEVICE)
        source.enqueue(keys, labels)
    state = source.state_dict()
    assert int(state["pointer"]) == 6 and int(state["count"]) == 6
    restored = NegativeQueue(size, dim, device=DEVICE, store_labels=True, backend=backend)
    restored.load_state_dict(state)
    for name, buf in source.state_dict().items():
        assert torch.equal(restored.state_dict()[name], buf), name
    assert len(restored) == 6 and torch.equal(restored.negatives(), source.negatives())
    # Both continue identically: the restored pointer is used, not 0.
    keys, labels, _ = _batch(5, dim, torch.float32, DEVICE)
    source.enqueue(keys, labels)
    restored.enqueue(keys, labels)
    for name, buf in source.state_dict().items():
        assert torch.equal(restored.state_dict()[name], buf), name
    assert (int(restored.pointer), len(restored)) == (2, 9)


def test_load_into_a_queue_of_another_dtype_and_device():
    source = NegativeQueue(6, 4, store_indices=True)
    source.enqueue(torch.randn(4, 4, dtype=torch.float64), indices=torch.arange(4))
    target_device = "cuda" if torch.cuda.is_available() else "cpu"
    target = NegativeQueue(6, 4, store_indices=True).to(device=target_device, dtype=torch.bfloat16)
    target.load_state_dict(source.state_dict())
    assert target.keys.dtype == torch.bfloat16 and target.keys.device.type == target_device
    assert torch.equal(target.negatives().cpu(), source.negatives().to(torch.bfloat16))
    assert torch.equal(target.stored_indices().cpu(), torch.arange(4))
    target.enqueue(torch.randn(3, 4, device=target_device), indices=torch.arange(
        4, 7, device=target_device))
    assert (int(target.pointer), len(target)) == (1, 6)


@pytest.mark.parametrize("pointer,count", [(9, 9), (2, 5), (-1, 0), (0, 10)])
def test_loading_a_corrupt_state_raises(pointer, count):
    state = NegativeQueue(9, 2).state_dict()
    state["pointer"] = torch.tensor(pointer)
    state["count"] = torch.tensor(count)
    with pytest.raises(ValueError, match="corrupt queue state"):
        NegativeQueue(9, 2).load_state_dict(state)


def test_reset_and_empty_batch():
    queue = NegativeQueue(4, 2, store_labels=True)
    queue.enqueue(torch.randn(0, 2), torch.zeros(0, dtype=torch.int64))
    assert len(queue) == 0 and queue.negatives().shape == (0, 2)
    queue.enqueue(torch.randn(6, 2), torch.arange(6, dtype=torch.int32))
    assert queue.is_full and queue.labels.tolist() == [4, 5, 2, 3]
    queue.reset()
    assert len(queue) == 0 and int(queue.pointer) == 0 and not queue.keys.any()
    assert queue.labels.tolist() == [-1] * 4
    queue.enqueue(torch.ones(1, 2), torch.tensor([7]))
    assert queue.stored_labels().tolist() == [7] and torch.equal(queue.negatives(),
                                                                  torch.ones(1, 2))


@pytest.mark.parametrize("make,error,match", [
    (lambda: NegativeQueue(0, 3), ValueError, "size must be >= 1, got 0"),
    (lambda: NegativeQueue(4.0, 3), TypeError, "size must be an int, got float"),
    (lambda: NegativeQueue(4, 0), ValueError, "dim must be >= 1"),
    (lambda: NegativeQueue(4, 3, dtype=torch.int64), TypeError, "dtype must be a floating"),
    (lambda: NegativeQueue(4, 3, store_labels=1), TypeError, "store_labels must be a bool"),
    (lambda: NegativeQueue(4, 3, backend="fast"), ValueError, "backend must be one of"),
])
def test_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("call,error,match", [
    (lambda q: q.enqueue([[1.0, 2.0, 3.0]]), TypeError, "keys must be a torch.Tensor, got list"),
    (lambda q: q.enqueue(torch.ones(2, 3, dtype=torch.int64)), TypeError,
     "keys must have a floating-point dtype, got torch.int64"),
    (lambda q: q.enqueue(torch.ones(2, 4)), ValueError,
     r"keys must have shape \(B, 3\), got \(2, 4\)"),
    (lambda q: q.enqueue(torch.ones(3)), ValueError, r"keys must have shape \(B, 3\), got \(3,\)"),
    (lambda q: q.enqueue(torch.ones(2, 3, device="meta")), ValueError,
     r"keys must be on the queue's device \(cpu\), got meta"),
    (lambda q: q.enqueue(torch.ones(2, 3)), ValueError, "labels is required"),
    (lambda q: q.enqueue(torch.ones(2, 3), torch.ones(2)), TypeError,
     "labels must have an integer dtype, got torch.float32"),
    (lambda q: q.enqueue(torch.ones(2, 3), torch.ones(3, dtype=torch.int64)), ValueError,
     r"labels must have shape \(2,\) \(one per key\), got \(3,\)"),
    (lambda q: q.enqueue(torch.ones(2, 3), torch.zeros(2, dtype=torch.int64), torch.arange(2)),
     ValueError, "indices was given but this queue was created with store_indices=False"),
    (lambda q: q.stored_indices(), ValueError, "does not store indices"),
    (lambda q: q.enqueue(torch.ones(2, 3), torch.zeros(2, dtype=torch.int64), backend="cuda"),
     ValueError, "backend='cuda' needs a queue on a CUDA device, got cpu"),
    (lambda q: q.enqueue(torch.ones(2, 3), torch.zeros(2, dtype=torch.int64), backend="x"),
     ValueError, "backend must be one of"),
])
def test_bad_enqueue_arguments(call, error, match):
    queue = NegativeQueue(4, 3, store_labels=True)
    with pytest.raises(error, match=match):
        call(queue)
    assert len(queue) == 0 and int(queue.pointer) == 0  # nothing was written
