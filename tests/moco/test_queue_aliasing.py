"""NegativeQueue.enqueue of rows that are views of the queue's own buffers (keys and labels):
slices with steps, negatives() views, overlapping and broadcast strides, at every pointer
(wrap-around included) and batch size (also larger than the queue), on every enqueue backend
that runs here, against a model that copies the incoming rows before pushing them one by one.
Also the integral types the constructor accepts for size and dim."""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastcontrast.queue import NegativeQueue, available_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = available_backends(DEVICE)


def _queue(size, dim, backend, pushes):
    """A queue whose every slot holds a distinct key and label (so a row written to a wrong
    slot, or read after it was overwritten, shows), after pushes of the given batch sizes."""
    queue = NegativeQueue(size, dim, device=DEVICE, store_labels=True, backend=backend)
    queue.keys.copy_(torch.randn(size, dim))
    queue.labels.copy_(torch.randperm(size) + 100)
    for batch in pushes:
        queue.enqueue(torch.randn(batch, dim, device=DEVICE),
                      torch.randint(0, 100, (batch,), device=DEVICE))
    return queue


def _enqueue_and_check(queue, keys, labels):
    """Enqueue (keys, labels) and compare with the model: the rows' values before the call,
    pushed one at a time."""
    size = queue.size
    pointer, count = int(queue.pointer), int(queue.count)
    expected_keys, expected_labels = queue.keys.clone(), queue.labels.clone()
    rows, row_labels = keys.clone(), labels.clone()
    for b in range(rows.shape[0]):
        expected_keys[(pointer + b) % size] = rows[b]
        expected_labels[(pointer + b) % size] = row_labels[b]
    queue.enqueue(keys, labels)
    assert torch.equal(queue.keys, expected_keys), (queue.keys, expected_keys)
    assert torch.equal(queue.labels, expected_labels), (queue.labels, expected_labels)
    assert int(queue.pointer) == (pointer + rows.shape[0]) % size
    assert int(queue.count) == min(count + rows.shape[0], size)
    assert len(queue) == int(queue.count)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_slice_of_the_buffer_at_every_pointer(backend):
    """Exhaustive: keys[start:stop:step] and labels[start:stop:step] of a 5-slot queue, for
    every start, stop, step in 1..3, and every pointer (full and partly filled queues)."""
    size, dim = 5, 2
    for pushes in ([], [2], [5], [7], [9]):
        for start in range(size + 1):
            for stop in range(start, size + 1):
                for step in (1, 2, 3):
                    queue = _queue(size, dim, backend, pushes)
                    rows = slice(start, stop, step)
                    _enqueue_and_check(queue, queue.keys[rows], queue.labels[rows])


@st.composite
def _aliasing_case(draw):
    size = draw(st.integers(1, 9))
    dim = draw(st.integers(1, 3))
    pushes = draw(st.lists(st.integers(1, 2 * size + 1), max_size=3))
    kind = draw(st.sampled_from(["slice", "negatives", "strided", "expand", "fresh"]))
    labels_kind = draw(st.sampled_from(["own", "fresh"]))
    return size, dim, pushes, kind, labels_kind, draw(st.data())


def _keys_view(queue, kind, data):
    """A (B, dim) view of the queue's key buffer of the given kind (or fresh rows), and the row
    pattern (offset, stride, B) in slots, for a labels view of the same shape."""
    size, dim = queue.size, queue.dim
    buf = queue.keys
    if kind == "fresh":
        batch = data.draw(st.integers(0, 2 * size + 1))
        return torch.randn(batch, dim, device=DEVICE)
    if kind in ("slice", "negatives"):
        source = buf if kind == "slice" else queue.negatives()
        n = source.shape[0]
        start = data.draw(st.integers(0, n))
        stop = data.draw(st.integers(start, n))
        step = data.draw(st.integers(1, 3))
        return source[start:stop:step]
    if kind == "expand":
        row = data.draw(st.integers(0, size - 1))
        return buf[row:row + 1].expand(data.draw(st.integers(0, 2 * size + 1)), dim)
    # as_strided: rows that overlap each other (row stride < dim), skip slots, or repeat (0).
    col_stride = data.draw(st.sampled_from([1, 2])) if dim > 1 else 1
    row_stride = data.draw(st.integers(0, dim + 1))
    span = (dim - 1) * col_stride
    if span >= size * dim:
        col_stride, span = 1, dim - 1
    offset = data.draw(st.integers(0, size * dim - 1 - span))
    room = size * dim - 1 - span - offset
    most = 2 * size + 1 if row_stride == 0 else room // row_stride + 1
    batch = data.draw(st.integers(0, most))
    return torch.as_strided(buf, (batch, dim), (row_stride, col_stride), offset)


def _labels_view(queue, batch, kind, data):
    if kind == "fresh" or batch == 0:
        return torch.randint(0, 100, (batch,), device=DEVICE)
    stride = data.draw(st.integers(0, 2))
    most_offset = queue.size - 1 - (batch - 1) * stride
    if most_offset < 0:
        stride, most_offset = 0, queue.size - 1
    offset = data.draw(st.integers(0, most_offset))
    return torch.as_strided(queue.labels, (batch,), (stride,), offset)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_aliasing_case())
def test_views_of_the_queue_fuzzed(backend, case):
    size, dim, pushes, kind, labels_kind, data = case
    queue = _queue(size, dim, backend, pushes)
    keys = _keys_view(queue, kind, data)
    labels = _labels_view(queue, keys.shape[0], labels_kind, data)
    _enqueue_and_check(queue, keys, labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negatives_view_in_a_wrapped_queue(backend):
    """The issue's example: q.enqueue(q.negatives()[1:]) on a full queue whose pointer is not 0
    (every other slot moves by one; the torch path raised torch's overlap error here)."""
    queue = _queue(6, 3, backend, [4, 5])
    _enqueue_and_check(queue, queue.negatives()[1:], queue.stored_labels()[1:])
    _enqueue_and_check(queue, queue.negatives(), queue.stored_labels())


# ---------------------------------------------------------------------------------------------
# size and dim: any integral type


def test_size_and_dim_accept_integral_types():
    queue = NegativeQueue(np.int64(4), np.int32(3))
    assert type(queue.size) is int and type(queue.dim) is int
    assert (queue.size, queue.dim) == (4, 3) and queue.keys.shape == (4, 3)
    queue.enqueue(torch.randn(6, 3))
    assert len(queue) == 4 and int(queue.pointer) == 2
    assert NegativeQueue(torch.tensor(5), np.uint8(2)).keys.shape == (5, 2)


@pytest.mark.parametrize("size,dim,error,message", [
    (True, 3, TypeError, "size must be an int, got bool"),
    (np.bool_(True), 3, TypeError, "size must be an int, got bool"),
    (torch.tensor(True), 3, TypeError, "size must be an int, got Tensor"),
    (4.0, 3, TypeError, "size must be an int, got float"),
    (np.float64(4.0), 3, TypeError, "size must be an int, got float64"),
    ("4", 3, TypeError, "size must be an int, got str"),
    (np.int64(0), 3, ValueError, "size must be >= 1, got 0"),
    (4, np.int64(-2), ValueError, "dim must be >= 1, got -2"),
    (4, False, TypeError, "dim must be an int, got bool"),
])
def test_size_and_dim_reject_non_integers(size, dim, error, message):
    with pytest.raises(error, match=message):
        NegativeQueue(size, dim)
