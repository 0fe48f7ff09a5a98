"""The communication layer of fastcontrast.distributed: the process group of a call, the one
metadata exchange that every call starts with, and the collectives the losses are built from.

Everything here runs on torch.distributed (NCCL on GPU, gloo on CPU) and inherits the timeout
the process group was created with (``init_process_group(timeout=...)`` / ``new_group``): a rank
that never arrives makes the others fail with that timeout, never hang. Peers are addressed by
their rank in the group; ``dist.get_global_rank`` turns it into the global rank the
point-to-point calls take, so every function works inside a subgroup.

    Comm(group)                    rank, world size and peers of the calling process in ``group``
    Comm.exchange(values)          all_gather of a few int64 per rank (shapes, dtypes, flags)
    all_gather_rows(t, sizes)      concatenation of every rank's rows in rank order (uneven ok)
    reduce_scatter_rows(t, sizes)  sum over ranks of t (total rows), this rank's slice
    all_reduce_logsumexp(lse)      log sum_r exp(lse_r) elementwise: max, then sum of exp
    all_reduce_logsumexp_with_grad the same, differentiable in every rank's lse
    AllGatherWithGrad              all_gather_rows whose backward is reduce_scatter_rows
    AllReduceWithGrad              all_reduce (sum) whose backward is the all_reduce of the
                                   gradients (each rank's share of the sum of all ranks' losses)
"""
import torch
import torch.distributed as dist

__all__ = ["Comm", "all_gather_rows", "reduce_scatter_rows", "all_reduce_logsumexp",
           "all_reduce_logsumexp_with_grad",
           "all_gather_with_grad", "all_reduce_with_grad", "DTYPE_CODES"]

EXCHANGE_WIDTH = 16  # int64 values per rank in the metadata exchange (plus a status)

# dtypes as small ints for the metadata exchange.
DTYPE_CODES = (torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
               torch.int32)


def dtype_code(dtype):
    return DTYPE_CODES.index(dtype) if dtype in DTYPE_CODES else len(DTYPE_CODES)


def dtype_name(code):
    return str(DTYPE_CODES[code]) if code < len(DTYPE_CODES) else "another dtype"


class Comm:
    """The calling process's view of ``group`` (None: the default group of all processes)."""

    def __init__(self, group=None, *, caller="fastcontrast.distributed"):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(f"{caller} needs an initialised torch.distributed process group: "
                               "call torch.distributed.init_process_group(...) first (torchrun "
                               "sets the environment it reads)")
        self.group = group
        self.caller = caller
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError(f"{caller}: this process (global rank {dist.get_rank()}) is not a "
                             "member of the group it was given")
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))

    def global_rank(self, group_rank):
        """The global rank of the process of rank ``group_rank`` in this group."""
        group_rank %= self.world
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def exchange(self, values, device, *, failed=False):
        """values (a list of at most EXCHANGE_WIDTH ints) of every rank: a list of W lists.
        One all_gather of EXCHANGE_WIDTH + 1 int64 on ``device`` (NCCL needs a CUDA tensor):
        a status, then the values padded. ``failed``: this rank refused its inputs (it sends
        no values and raises its own error after the call); the other ranks then raise a
        ValueError naming it, so that no rank is left waiting in a later collective."""
        if len(values) > EXCHANGE_WIDTH:
            raise AssertionError(f"at most {EXCHANGE_WIDTH} values per exchange")
        padded = [int(failed)] + list(values) + [0] * (EXCHANGE_WIDTH - len(values))
        if self.world == 1:
            return [list(values)]
        local = torch.tensor(padded, dtype=torch.int64, device=device)
        out = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(out, local, group=self.group)
        rows = [t.tolist() for t in out]
        refused = [r for r, row in enumerate(rows) if row[0]]
        if refused and not failed:
            raise ValueError(f"{self.caller}: the inputs of rank(s) {refused} of the group were "
                             "refused (the error is raised there); every rank stops here")
        return [row[1:1 + len(values)] for row in rows]

    def agree(self, check, device):
        """Runs ``check()`` (local argument checks) so that every rank of the group raises when
        any rank's check raises a TypeError or ValueError: that rank re-raises its own error
        after one status exchange, the others a ValueError naming it (Comm.exchange)."""
        try:
            result = check()
        except (TypeError, ValueError):
            self.exchange([], device, failed=True)
            raise
        self.exchange([], device)
        return result

    def check_same(self, table, column, what):
        """ValueError naming ``what`` and every rank's value unless table[r][column] agree."""
        values = [row[column] for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"{self.caller}: {what} must be the same on every rank of the "
                             f"group, got {values} on ranks {list(range(self.world))}")
        return values[0]

    def check_dtype(self, table, column, name):
        codes = [row[column] for row in table]
        if len(set(codes)) > 1:
            raise ValueError(f"{self.caller}: {name} must have the same dtype on every rank of "
                             f"the group, got {[dtype_name(c) for c in codes]} on ranks "
                             f"{list(range(self.world))}")


def _padded(t, rows):
    if t.shape[0] == rows:
        return t.contiguous()
    out = t.new_zeros((rows,) + tuple(t.shape[1:]))
    out[:t.shape[0]] = t
    return out


def all_gather_rows(comm, t, sizes):
    """The rows of every rank's ``t`` (rank r has sizes[r] rows) concatenated in rank order."""
    if comm.world == 1:
        return t
    rows = max(sizes)
    parts = [t.new_empty((rows,) + tuple(t.shape[1:])) for _ in range(comm.world)]
    dist.all_gather(parts, _padded(t, rows), group=comm.group)
    if all(size == rows for size in sizes):
        return torch.cat(parts)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def reduce_scatter_rows(comm, t, sizes):
    """sum over ranks of ``t`` (sum(sizes) rows on every rank), rows of this rank. NCCL: one
    reduce_scatter of padded blocks; gloo (no reduce_scatter): all_reduce, then the slice."""
    if comm.world == 1:
        return t
    offset = sum(sizes[:comm.rank])
    if comm.backend != "nccl":
        t = t.contiguous().clone()
        dist.all_reduce(t, group=comm.group)
        return t[offset:offset + sizes[comm.rank]]
    rows = max(sizes)
    blocks, start = [], 0
    for size in sizes:
        blocks.append(_padded(t[start:start + size], rows))
        start += size
    out = t.new_empty((rows,) + tuple(t.shape[1:]))
    dist.reduce_scatter(out, blocks, group=comm.group)
    return out[:sizes[comm.rank]]


def _ranks_max(comm, lse):
    """The elementwise max of lse over the ranks, 0 where it is not finite (the shift of a
    log-sum-exp across ranks; no gradient)."""
    top = lse.detach().clone()
    if comm.world > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=comm.group)
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))


def all_reduce_logsumexp(comm, lse):
    """log sum_r exp(lse_r) elementwise over the ranks (-inf where every rank has -inf), in
    log space: an all_reduce of the max, then of the sum of exp(lse - max)."""
    if comm.world == 1:
        return lse
    top = _ranks_max(comm, lse)
    total = torch.exp(lse - top)
    dist.all_reduce(total, group=comm.group)
    return torch.log(total) + top


def all_reduce_logsumexp_with_grad(comm, lse):
    """all_reduce_logsumexp, differentiable in every rank's lse (AllReduceWithGrad's backward
    hands each rank its share)."""
    top = _ranks_max(comm, lse)
    return torch.log(AllReduceWithGrad.apply(torch.exp(lse - top), comm)) + top


class AllGatherWithGrad(torch.autograd.Function):
    """all_gather_rows with an exact backward: the gradient of the sum of all ranks' losses with
    respect to this rank's rows, i.e. the reduce-scatter (sum) of every rank's gradient of the
    gathered tensor (not the local slice of the local gradient, SimCLR's GatherLayer bug)."""

    @staticmethod
    def forward(ctx, t, comm, sizes):
        ctx.comm, ctx.sizes = comm, sizes
        return all_gather_rows(comm, t.contiguous(), sizes)

    @staticmethod
    def backward(ctx, grad):
        return reduce_scatter_rows(ctx.comm, grad.contiguous(), ctx.sizes), None, None


class AllReduceWithGrad(torch.autograd.Function):
    """sum over ranks of ``t``; backward: sum over ranks of the gradients (each rank's input
    gets the gradient of the sum of all ranks' losses)."""

    @staticmethod
    def forward(ctx, t, comm):
        ctx.comm = comm
        out = t.contiguous().clone()
        if comm.world > 1:
            dist.all_reduce(out, group=comm.group)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        if ctx.comm.world > 1:
            dist.all_reduce(grad, group=ctx.comm.group)
        return grad, None


def row_sizes(comm, t):
    """Every rank's number of rows of ``t`` (one small all_gather); the trailing dimensions and
    the dtype must agree across ranks (ValueError naming them otherwise)."""
    table = comm.exchange([t.shape[0], t.dim(), *t.shape[1:3], *[0] * (3 - t.dim()),
                           dtype_code(t.dtype)], t.device)
    comm.check_same(table, 1, "the number of dimensions of the tensor")
    comm.check_same(table, 2, "the trailing dimensions (shape[1:]) of the tensor")
    comm.check_same(table, 3, "the trailing dimensions (shape[1:]) of the tensor")
    comm.check_dtype(table, 4, "the tensor")
    return [row[0] for row in table]


def all_gather_with_grad(tensor, group=None):
    """Every rank's ``tensor`` (rows may differ per rank) concatenated along dim 0 in group-rank
    order, differentiable: the backward gives each rank the gradient of the sum of all ranks'
    losses with respect to its own rows (reduce-scatter; all-reduce and slice on gloo)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() < 1 or tensor.dim() > 3:
        raise ValueError("all_gather_with_grad takes a 1-D to 3-D tensor")
    comm = Comm(group, caller="fastcontrast.distributed.all_gather_with_grad")
    return AllGatherWithGrad.apply(tensor, comm, row_sizes(comm, tensor))


def all_reduce_with_grad(tensor, group=None):
    """sum over the ranks of ``group`` of ``tensor``, differentiable (see AllReduceWithGrad)."""
    comm = Comm(group, caller="fastcontrast.distributed.all_reduce_with_grad")
    return AllReduceWithGrad.apply(tensor, comm)
