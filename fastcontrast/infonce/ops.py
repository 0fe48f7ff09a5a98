"""The kernel ops of the InfoNCE family, registered with torch.library (namespace
``fastcontrast``), each with a fake kernel for meta tensors and torch.compile. Every loss of the
family reduces to the masked log-sum-exp of a scaled product and its gradient:

    s_ij = alpha_i * beta_j * <query_i, keys_j>,   entry (i, j) masked iff exclude_diag and
           j == i + diag_offset, or row_ids_i == col_ids_j >= 0 (ids given)
    masked_lse_forward            -> row_lse_i = logsumexp_j s_ij, col_lse_j = logsumexp_i s_ij
    masked_lse_backward           -> with dS_ij = g_i exp(s_ij - row_lse_i)
                                                  + c_j exp(s_ij - col_lse_j):
                                     dquery_i = alpha_i sum_j dS_ij beta_j keys_j,
                                     dkeys_j = beta_j sum_i dS_ij alpha_i query_i
    masked_lse_forward_with_grad  -> both in one pass, no recompute (backends that fuse it)

Optional false-negative filter (fastcontrast/infonce/false_negatives.py), in every full-product
op: candidate (i, j) is dropped, as if masked, iff j != positive_col_i and s_ij > threshold_i or
<guide_q_i, guide_keys_j> > guide_threshold_i; masked_lse_dropped counts them per row. With the
column rule (col_positive_row given: the symmetric loss, one pass) entry (i, j) leaves column j's
log-sum-exp iff i != col_positive_row_j and s_ij > col_threshold_j or
<guide_q_i, guide_keys_j> > col_guide_threshold_j, independently of the row rule (each direction
drops by its own thresholds; the backward masks the row and the column term apart), and
masked_lse_dropped returns the N row counts followed by the M column counts.

The per-device kernel runs the implementation of the backend named in the call
(fastcontrast.backends.kernels): kernels/infonce.py (triton), csrc/cpu/infonce.cpp (cpu),
fastcontrast/_torch_chunked.py (torch). Absent optional outputs are empty (0-element) tensors.

A set against itself (query = keys = z, alpha = c beta: NT-Xent, SupCon, info_nce with
exclude_self where the query is the key) has a symmetric s and goes through the symmetric-Gram
ops, which compute only the tiles on and above the diagonal and use each for both its rows and
columns (csrc/cpu/gram.cpp, kernels/gram.py; torch: a fall-through to the ops above):

    gram_lse_forward   -> row_lse_i = logsumexp_j s_ij
    gram_lse_backward  -> dz_i = sum_j alpha_i beta_j (dS_ij + dS_ji) z_j,
                          dS_ij = g_i exp(s_ij - row_lse_i)

The mask must be symmetric there (the diagonal, ids of an involution such as NT-Xent's
positives). The gram setting (FASTCONTRAST_GRAM=0, fastcontrast/_config.py) sends these losses
through the full-product ops instead: the baseline of benchmarks/gram_targets.py.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import backends
from .._config import settings
from .._host import or_empty

__all__ = ["masked_lse_forward", "masked_lse_backward", "masked_lse_forward_with_grad",
           "masked_lse_dropped", "gram_lse_forward", "gram_lse_backward"]


def _contiguous(*tensors):
    return [None if t is None else t.contiguous() for t in tensors]


def _filter(threshold, positive_col, guide_q, guide_keys, guide_threshold, col_threshold=None,
            col_positive_row=None, col_guide_threshold=None):
    """The filter's keyword arguments of a kernel call: none without a filter (so a kernel module
    without filter support is called as before), the column rule's only with one (so a
    one-directional call reaches a kernel module as before)."""
    given = dict(threshold=threshold, positive_col=positive_col, guide_q=guide_q,
                 guide_keys=guide_keys, guide_threshold=guide_threshold)
    if col_positive_row is not None:
        given.update(col_threshold=col_threshold, col_positive_row=col_positive_row,
                     col_guide_threshold=col_guide_threshold)
    if all(t is None for t in given.values()):
        return {}
    return dict(zip(given, _contiguous(*given.values())))


@torch.library.custom_op("fastcontrast::masked_lse_forward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def masked_lse_forward(query: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor,
                       row_ids: Optional[Tensor], col_ids: Optional[Tensor], exclude_diag: bool,
                       diag_offset: int, with_col_lse: bool, backend: str,
                       threshold: Optional[Tensor] = None,
                       positive_col: Optional[Tensor] = None, guide_q: Optional[Tensor] = None,
                       guide_keys: Optional[Tensor] = None,
                       guide_threshold: Optional[Tensor] = None,
                       col_threshold: Optional[Tensor] = None,
                       col_positive_row: Optional[Tensor] = None,
                       col_guide_threshold: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(row_lse (N,), col_lse (M,), or (0,) without ``with_col_lse``); -inf where no entry."""
    query, keys, alpha, beta, row_ids, col_ids = _contiguous(query, keys, alpha, beta, row_ids,
                                                             col_ids)
    row_lse, col_lse = backends.kernels("infonce", backend).masked_lse_forward(
        query, keys, alpha, beta, exclude_diag=exclude_diag, diag_offset=diag_offset,
        row_ids=row_ids, col_ids=col_ids, with_col_lse=with_col_lse,
        **_filter(threshold, positive_col, guide_q, guide_keys, guide_threshold, col_threshold,
                  col_positive_row, col_guide_threshold))
    return row_lse, or_empty(col_lse, row_lse)


@masked_lse_forward.register_fake
def _forward_fake(query, keys, alpha, beta, row_ids, col_ids, exclude_diag, diag_offset,
                  with_col_lse, backend, threshold=None, positive_col=None, guide_q=None,
                  guide_keys=None, guide_threshold=None, col_threshold=None,
                  col_positive_row=None, col_guide_threshold=None):
    dtype = backends.PROPERTIES[backend].output_dtype(query.dtype)
    return (query.new_empty(query.shape[0], dtype=dtype),
            query.new_empty(keys.shape[0] if with_col_lse else 0, dtype=dtype))


@torch.library.custom_op("fastcontrast::masked_lse_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def masked_lse_backward(query: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor, row_lse: Tensor,
                        row_grad: Tensor, col_lse: Optional[Tensor], col_grad: Optional[Tensor],
                        row_ids: Optional[Tensor], col_ids: Optional[Tensor], exclude_diag: bool,
                        diag_offset: int, need_dq: bool, need_dkeys: bool,
                        backend: str, threshold: Optional[Tensor] = None,
                        positive_col: Optional[Tensor] = None, guide_q: Optional[Tensor] = None,
                        guide_keys: Optional[Tensor] = None,
                        guide_threshold: Optional[Tensor] = None,
                        col_threshold: Optional[Tensor] = None,
                        col_positive_row: Optional[Tensor] = None,
                        col_guide_threshold: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(dq (N, D), dkeys (M, D)), each (0,) when not needed; recomputes the score tiles."""
    args = _contiguous(query, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad, row_ids,
                       col_ids)
    query, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad, row_ids, col_ids = args
    dq, dkeys = backends.kernels("infonce", backend).masked_lse_backward(
        query, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad, exclude_diag=exclude_diag,
        diag_offset=diag_offset, row_ids=row_ids, col_ids=col_ids, need_dq=need_dq,
        need_dkeys=need_dkeys, **_filter(threshold, positive_col, guide_q, guide_keys,
                                         guide_threshold, col_threshold, col_positive_row,
                                         col_guide_threshold))
    return or_empty(dq, row_lse), or_empty(dkeys, row_lse)


def _fake_gradients(query, keys, need_dq, need_dkeys, backend):
    dtype = backends.PROPERTIES[backend].output_dtype(query.dtype)
    return (query.new_empty(query.shape if need_dq else (0,), dtype=dtype),
            query.new_empty(keys.shape if need_dkeys else (0,), dtype=dtype))


@masked_lse_backward.register_fake
def _backward_fake(query, keys, alpha, beta, row_lse, row_grad, col_lse, col_grad, row_ids, col_ids,
                   exclude_diag, diag_offset, need_dq, need_dkeys, backend, threshold=None,
                   positive_col=None, guide_q=None, guide_keys=None, guide_threshold=None,
                   col_threshold=None, col_positive_row=None, col_guide_threshold=None):
    return _fake_gradients(query, keys, need_dq, need_dkeys, backend)


@torch.library.custom_op("fastcontrast::masked_lse_forward_with_grad", mutates_args=(),
                         device_types=("cpu", "cuda"))
def masked_lse_forward_with_grad(query: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor,
                                 row_grad: Tensor, row_ids: Optional[Tensor],
                                 col_ids: Optional[Tensor], extra_lse: Optional[Tensor],
                                 exclude_diag: bool, diag_offset: int, need_dq: bool,
                                 need_dkeys: bool, backend: str,
                                 threshold: Optional[Tensor] = None,
                                 positive_col: Optional[Tensor] = None,
                                 guide_q: Optional[Tensor] = None,
                                 guide_keys: Optional[Tensor] = None,
                                 guide_threshold: Optional[Tensor] = None
                                 ) -> Tuple[Tensor, Tensor, Tensor]:
    """(row_lse, dq, dkeys) in one pass over the scores: row_lse = logaddexp(this product's lse,
    extra_lse); dq / dkeys those of masked_lse_backward with that row_lse, no column term."""
    args = _contiguous(query, keys, alpha, beta, row_grad, row_ids, col_ids, extra_lse)
    query, keys, alpha, beta, row_grad, row_ids, col_ids, extra_lse = args
    row_lse, dq, dkeys = backends.kernels("infonce", backend).masked_lse_forward_with_grad(
        query, keys, alpha, beta, row_grad, exclude_diag=exclude_diag, diag_offset=diag_offset,
        row_ids=row_ids, col_ids=col_ids, extra_lse=extra_lse, need_dq=need_dq,
        need_dkeys=need_dkeys, **_filter(threshold, positive_col, guide_q, guide_keys,
                                         guide_threshold))
    return row_lse, or_empty(dq, row_lse), or_empty(dkeys, row_lse)


@masked_lse_forward_with_grad.register_fake
def _forward_with_grad_fake(query, keys, alpha, beta, row_grad, row_ids, col_ids, extra_lse,
                            exclude_diag, diag_offset, need_dq, need_dkeys, backend,
                            threshold=None, positive_col=None, guide_q=None, guide_keys=None,
                            guide_threshold=None):
    dtype = backends.PROPERTIES[backend].output_dtype(query.dtype)
    return (query.new_empty(query.shape[0], dtype=dtype),
            *_fake_gradients(query, keys, need_dq, need_dkeys, backend))


@torch.library.custom_op("fastcontrast::masked_lse_dropped", mutates_args=(),
                         device_types=("cpu", "cuda"))
def masked_lse_dropped(query: Tensor, keys: Tensor, alpha: Tensor, beta: Tensor,
                       row_ids: Optional[Tensor], col_ids: Optional[Tensor], exclude_diag: bool,
                       diag_offset: int, backend: str, threshold: Optional[Tensor],
                       positive_col: Optional[Tensor], guide_q: Optional[Tensor],
                       guide_keys: Optional[Tensor], guide_threshold: Optional[Tensor],
                       col_threshold: Optional[Tensor] = None,
                       col_positive_row: Optional[Tensor] = None,
                       col_guide_threshold: Optional[Tensor] = None) -> Tensor:
    """int64 (N,): the candidates of each row that the false-negative filter drops (the tiles
    of the forward pass, without exps); with the column rule (N + M,): then each column's."""
    query, keys, alpha, beta, row_ids, col_ids = _contiguous(query, keys, alpha, beta, row_ids,
                                                             col_ids)
    return backends.kernels("infonce", backend).masked_lse_dropped(
        query, keys, alpha, beta, exclude_diag=exclude_diag, diag_offset=diag_offset,
        row_ids=row_ids, col_ids=col_ids,
        **_filter(threshold, positive_col, guide_q, guide_keys, guide_threshold, col_threshold,
                  col_positive_row, col_guide_threshold))


@masked_lse_dropped.register_fake
def _dropped_fake(query, keys, alpha, beta, row_ids, col_ids, exclude_diag, diag_offset, backend,
                  threshold, positive_col, guide_q, guide_keys, guide_threshold,
                  col_threshold=None, col_positive_row=None, col_guide_threshold=None):
    columns = 0 if col_positive_row is None else keys.shape[0]
    return query.new_empty(query.shape[0] + columns, dtype=torch.int64)


@torch.library.custom_op("fastcontrast::gram_lse_forward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def gram_lse_forward(z: Tensor, alpha: Tensor, beta: Tensor, row_ids: Optional[Tensor],
                     col_ids: Optional[Tensor], exclude_diag: bool, backend: str) -> Tensor:
    """row_lse (N,) of the symmetric s_ij = alpha_i beta_j <z_i, z_j>; -inf where no entry."""
    z, alpha, beta, row_ids, col_ids = _contiguous(z, alpha, beta, row_ids, col_ids)
    return backends.kernels("gram", backend).gram_lse_forward(
        z, alpha, beta, exclude_diag=exclude_diag, row_ids=row_ids, col_ids=col_ids,
        block_rows=settings().gram_block_rows)


@gram_lse_forward.register_fake
def _gram_forward_fake(z, alpha, beta, row_ids, col_ids, exclude_diag, backend):
    return z.new_empty(z.shape[0], dtype=backends.PROPERTIES[backend].output_dtype(z.dtype))


@torch.library.custom_op("fastcontrast::gram_lse_backward", mutates_args=(),
                         device_types=("cpu", "cuda"))
def gram_lse_backward(z: Tensor, alpha: Tensor, beta: Tensor, row_lse: Tensor, row_grad: Tensor,
                      row_ids: Optional[Tensor], col_ids: Optional[Tensor], exclude_diag: bool,
                      backend: str) -> Tensor:
    """dz (N, D): the gradient of sum_i row_grad_i row_lse_i through z in both roles."""
    args = _contiguous(z, alpha, beta, row_lse, row_grad, row_ids, col_ids)
    z, alpha, beta, row_lse, row_grad, row_ids, col_ids = args
    return backends.kernels("gram", backend).gram_lse_backward(
        z, alpha, beta, row_lse, row_grad, exclude_diag=exclude_diag, row_ids=row_ids,
        col_ids=col_ids, block_rows=settings().gram_block_rows)


@gram_lse_backward.register_fake
def _gram_backward_fake(z, alpha, beta, row_lse, row_grad, row_ids, col_ids, exclude_diag,
                        backend):
    return z.new_empty(z.shape, dtype=backends.PROPERTIES[backend].output_dtype(z.dtype))
