"""NegativeQueue: MoCo's ring buffer of negative keys (optionally with their labels and sample
indices), as an nn.Module whose whole state is registered buffers.

    queue = NegativeQueue(65536, 128, store_indices=True)
    loss = fc.moco_loss(q, k, queue.negatives())        # the filled rows, no copy
    queue.enqueue(k, indices=batch_ids)                 # after the step, any batch size

Enqueue semantics (as if the B rows were pushed one by one): row b of the batch goes to slot
(pointer + b) % size; pointer <- (pointer + B) % size; count <- min(count + B, size). A batch
larger than the queue keeps only its last ``size`` rows. Rows are stored in ring order, not
oldest first: once the queue has wrapped, negatives() returns slot order (the oldest row is
at ``pointer``). InfoNCE sums over its negatives, so the order does not change the loss; use
``negatives(oldest_first=True)`` for a chronological copy.

Backends of the enqueue, one fused write of keys (cast to the queue dtype), labels, indices,
pointer and count:
  "torch"   slice copies (at most two contiguous runs per buffer; copy_ casts on the fly); the
            only path on CPU, where a launch costs nothing
  "triton"  kernels/queue.py, one launch (CUDA; CPU under TRITON_INTERPRET=1)
  "cuda"    csrc/cuda/queue.cu, one launch (built just in time)
  "auto"    "triton" on CUDA when triton imports, else "torch".

The pointer and count live in 0-dim int64 buffers (so .to(), state_dict() and load_state_dict()
carry them) and are mirrored as Python ints, so an enqueue never reads the device; the mirror is
refreshed (and checked) after load_state_dict().
"""
import operator
from typing import Optional

import torch
from torch import Tensor, nn

from . import _validation as check
from . import backends

__all__ = ["NegativeQueue", "available_backends", "queue_enqueue_"]

BACKENDS = ("auto",) + backends.FAMILIES["queue"]


def _check_size(name, value):
    """An integer >= 1 of any integral type (int, numpy.int64, ...: operator.index), as an int;
    bools (also numpy / torch ones) and floats are refused."""
    index = None
    if not isinstance(value, bool) and getattr(value, "dtype", None) != torch.bool:
        try:
            index = operator.index(value)
        except TypeError:
            pass
    if index is None:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if index < 1:
        raise ValueError(f"{name} must be >= 1, got {index}")
    return index


def available_backends(device="cpu"):
    """The enqueue backends that can run on a queue on ``device`` in this process."""
    return backends.available_backends(device, family="queue")


def _shares_memory(a, b):
    """Whether the storages of a and b overlap (a view of the other, or of the same memory
    through another tensor): decided by the memory ranges, never by the values."""
    if a.device != b.device:
        return False
    sa, sb = a.untyped_storage(), b.untyped_storage()
    pa, pb = sa.data_ptr(), sb.data_ptr()
    return pa < pb + sb.nbytes() and pb < pa + sa.nbytes()


def _detached_from(rows, destinations):
    """``rows``, or a copy of them when they share memory with a buffer the enqueue writes: the
    slice copies (and the kernels) would otherwise read rows they have already overwritten,
    or meet torch's overlap check (e.g. queue.enqueue(queue.negatives()[1:]))."""
    if rows is not None and any(d is not None and _shares_memory(rows, d) for d in destinations):
        return rows.clone()
    return rows


def _write_slices(dst, rows, pointer):
    """The ring write of ``rows`` (B, ...) into ``dst`` (size, ...) at ``pointer`` as at most two
    slice copies (copy_ casts on the fly); a batch larger than the buffer keeps its last rows."""
    batch, size = rows.shape[0], dst.shape[0]
    kept = min(batch, size)
    start = (pointer + batch - kept) % size  # slot of the first kept row
    head = min(kept, size - start)           # rows before the end of the buffer
    src = rows[batch - kept:]
    dst[start:start + head].copy_(src[:head])
    if kept > head:
        dst[:kept - head].copy_(src[head:])


@torch.library.custom_op("fastcontrast::queue_enqueue_",
                         mutates_args=("dst", "pointer_buf", "count_buf", "dst_labels",
                                       "dst_indices"), device_types=("cpu", "cuda"))
def queue_enqueue_(dst: Tensor, keys: Tensor, pointer: int, count: int, pointer_buf: Tensor,
                   count_buf: Tensor, dst_labels: Optional[Tensor], labels: Optional[Tensor],
                   dst_indices: Optional[Tensor], indices: Optional[Tensor],
                   backend: str) -> None:
    """Ring-buffer write of ``keys`` (B, D) (and labels / indices (B,)) into ``dst`` (size, D)
    at slot ``pointer`` as if row by row, then pointer_buf <- (pointer + B) % size and
    count_buf <- min(count + B, size); backend "torch" (slice copies), "triton"
    (kernels/queue.py) or "cuda" (csrc/cuda/queue.cu), one launch for the fused ones. Rows that
    share memory with a written buffer (a view of the queue itself) are copied first."""
    destinations = (dst, dst_labels, dst_indices)
    keys, labels, indices = (_detached_from(t, destinations) for t in (keys, labels, indices))
    if backend == "torch":
        for buffer, rows in ((dst, keys), (dst_labels, labels), (dst_indices, indices)):
            if rows is not None:
                _write_slices(buffer, rows, pointer)
        pointer_buf.fill_((pointer + keys.shape[0]) % dst.shape[0])
        count_buf.fill_(min(count + keys.shape[0], dst.shape[0]))
        return
    if keys.stride(1) != 1:  # the kernels read rows with unit column stride
        keys = keys.contiguous()
    buffers = dict(dst_labels=dst_labels, labels=labels, dst_indices=dst_indices, indices=indices)
    if backend == "triton":
        backends.kernels("queue", "triton").enqueue_(dst, keys, pointer, count, pointer_buf,
                                                     count_buf, **buffers)
    else:
        backends.kernels("queue", "cuda").queue_enqueue_(dst, keys, pointer, count, pointer_buf,
                                                          count_buf, **buffers)


@queue_enqueue_.register_fake
def _enqueue_fake(dst, keys, pointer, count, pointer_buf, count_buf, dst_labels, labels,
                  dst_indices, indices, backend):
    return None


class NegativeQueue(nn.Module):
    """Ring buffer of ``size`` keys of dimension ``dim`` (buffers: keys (size, dim), optional
    labels / indices (size,) int64, pointer and count (0-dim int64)); see the module docstring.
    ``persistent=False`` keeps the buffers out of ``state_dict()`` (a module that embeds the
    queue as scratch state, so checkpoints keep the keys of a module without a queue)."""

    def __init__(self, size, dim, *, dtype=torch.float32, device=None, store_labels=False,
                 store_indices=False, backend="auto", persistent=True):
        super().__init__()
        size, dim = _check_size("size", size), _check_size("dim", dim)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        check.check_flag("store_labels", store_labels)
        check.check_flag("store_indices", store_indices)
        check.check_choice("backend", backend, BACKENDS)
        check.check_flag("persistent", persistent)
        self.size, self.dim, self.backend = size, dim, backend
        self.store_labels, self.store_indices = store_labels, store_indices
        self.register_buffer("keys", torch.zeros(size, dim, dtype=dtype, device=device),
                             persistent=persistent)
        for name, stored in (("labels", store_labels), ("indices", store_indices)):
            if stored:
                self.register_buffer(name, torch.full((size,), -1, dtype=torch.int64,
                                                      device=device), persistent=persistent)
        for name in ("pointer", "count"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64, device=device),
                                 persistent=persistent)
        self._host = (0, 0)  # mirror of (pointer, count); None: read the buffers first

    # -----------------------------------------------------------------------------------------
    # State

    def _state(self):
        """(pointer, count) as ints, from the mirror (or from the buffers after a load)."""
        if self._host is None:
            pointer, count = int(self.pointer), int(self.count)
            if not (0 <= count <= self.size and 0 <= pointer < self.size):
                raise ValueError(f"corrupt queue state: pointer must be in [0, {self.size}) and "
                                 f"count in [0, {self.size}], got pointer {pointer}, count {count}")
            if count < self.size and pointer != count:
                raise ValueError(f"corrupt queue state: a queue that is not full has "
                                 f"pointer == count, got pointer {pointer}, count {count}")
            self._host = (pointer, count)
        return self._host

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host = None  # the buffers changed under the mirror
        self._state()      # fail now, not at the next enqueue, if the loaded state is corrupt

    def __len__(self):
        """Number of filled rows, min(total enqueued, size)."""
        return self._state()[1]

    @property
    def is_full(self):
        return len(self) == self.size

    @property
    def next_slot(self):
        """The slot the next enqueued row goes to, as an int (from the host mirror: no device
        read)."""
        return self._state()[0]

    def extra_repr(self):
        return (f"size={self.size}, dim={self.dim}, dtype={self.keys.dtype}, filled={len(self)}, "
                f"store_labels={self.store_labels}, store_indices={self.store_indices}")

    @torch.no_grad()
    def reset(self):
        """Empty the queue (pointer and count 0; keys zeroed, labels and indices set to -1)."""
        self.keys.zero_()
        for name in ("labels", "indices"):
            if hasattr(self, name):
                getattr(self, name).fill_(-1)
        self.pointer.zero_()
        self.count.zero_()
        self._host = (0, 0)

    # -----------------------------------------------------------------------------------------
    # Reading

    def negatives(self, *, oldest_first=False):
        """The filled rows, (min(count, size), dim): a view of ``keys`` in slot order, or with
        ``oldest_first`` a chronological copy once the queue has wrapped."""
        return self._filled(self.keys, oldest_first)

    def stored_labels(self, *, oldest_first=False):
        """Labels of the filled rows, aligned with negatives() (needs store_labels=True)."""
        return self._filled(self._stored("labels"), oldest_first)

    def stored_indices(self, *, oldest_first=False):
        """Sample indices of the filled rows, aligned with negatives() (needs store_indices)."""
        return self._filled(self._stored("indices"), oldest_first)

    def _stored(self, name):
        if not getattr(self, f"store_{name}"):
            raise ValueError(f"this queue does not store {name}; create it with "
                             f"store_{name}=True")
        return getattr(self, name)

    def _filled(self, buffer, oldest_first):
        pointer, count = self._state()
        if oldest_first and count == self.size and pointer != 0:
            return torch.cat([buffer[pointer:], buffer[:pointer]])
        return buffer[:count]

    # -----------------------------------------------------------------------------------------
    # Writing

    def _check_rows(self, name, t, batch):
        """Optional (B,) integer tensor on the queue's device, returned as int64."""
        stored = getattr(self, f"store_{name}")
        if t is None:
            if stored:
                raise ValueError(f"{name} is required: this queue was created with "
                                 f"store_{name}=True")
            return None
        if not stored:
            raise ValueError(f"{name} was given but this queue was created with "
                             f"store_{name}=False")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must have an integer dtype, got {t.dtype}")
        if tuple(t.shape) != (batch,):
            raise ValueError(f"{name} must have shape ({batch},) (one per key), got "
                             f"{tuple(t.shape)}")
        if t.device != self.keys.device:
            raise ValueError(f"{name} must be on the queue's device ({self.keys.device}), got "
                             f"{t.device}")
        return t.to(torch.int64).contiguous()

    def _check_keys(self, keys):
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
        if not keys.is_floating_point():
            raise TypeError(f"keys must have a floating-point dtype, got {keys.dtype}")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(keys.shape)}")
        if keys.device != self.keys.device:
            raise ValueError(f"keys must be on the queue's device ({self.keys.device}), got "
                             f"{keys.device}")

    def _resolve(self, backend):
        return backends.resolve(backend, self.keys.device, family="queue")

    @torch.no_grad()
    def enqueue(self, keys, labels=None, indices=None, *, backend=None):
        """Push a batch of keys (B, dim) (any floating dtype: cast to the queue's dtype; any
        B >= 0, also B > size), with labels / indices (B,) when the queue stores them.
        ``backend`` overrides the queue's backend for this call."""
        self._check_keys(keys)
        batch = keys.shape[0]
        labels = self._check_rows("labels", labels, batch)
        indices = self._check_rows("indices", indices, batch)
        name = self._resolve(self.backend if backend is None else backend)
        pointer, count = self._state()
        if batch == 0:
            return
        queue_enqueue_(self.keys, keys.detach(), pointer, count, self.pointer, self.count,
                       getattr(self, "labels", None) if labels is not None else None, labels,
                       getattr(self, "indices", None) if indices is not None else None, indices,
                       name)
        self._host = ((pointer + batch) % self.size, min(count + batch, self.size))
