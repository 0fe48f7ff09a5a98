"""Similarity distillation over the keys of every rank: fastcontrast.distill_info_nce on the
concatenated batch (the formulas are fastcontrast/distill.py's),

    loss_i = sum_j p^T_ij (lse^S_i - s^S_ij),  p^T_ij = softmax_j(t_ij),  j over every rank's keys
    symmetric (N_r == M_r on every rank): loss_i = (row_i + col_i) / 2, col_i over every rank's
    queries

the public call: local checks, the metadata exchange, normalisation (plain autograd, in the
accumulation dtype; the teacher without gradient) and the group's reduction; the loss itself is
distill_ops.DistributedDistill in either mode.
"""
import torch

from .. import _loss_args as args
from .._host import REDUCTIONS, accumulate_dtype
from .._loss_args import output_dtype_policy
from .calls import (compute_dtype, exchange, float_code, group_reduce, mode_code, prepare,
                    refusal, start_call)
from .collectives import dtype_code
from .distill_ops import DistributedDistill

__all__ = ["distill_info_nce"]


@output_dtype_policy
def distill_info_nce(student_query, student_key, teacher_query, teacher_key, *, temperature,
                     teacher_temperature, symmetric=True, normalize=True, reduction="mean",
                     backend="auto", mode="gather", group=None):
    """fastcontrast.distill_info_nce over the keys of every rank of ``group`` (see
    fastcontrast.distributed for the convention). Each rank passes its share: student_query
    (N_r, D), student_key (M_r, D), teacher_query (N_r, DT), teacher_key (M_r, DT); symmetric
    needs N_r == M_r on every rank. The teacher (features and temperature) gets no gradient;
    the student temperature's gradient is this rank's share (DDP averages it). "none": this
    rank's rows."""
    with refusal(group, "distill_info_nce", student_query):
        tau, teacher_tau = args.distill_args(
            student_query, student_key, teacher_query, teacher_key, temperature=temperature,
            teacher_temperature=teacher_temperature, symmetric=symmetric, normalize=normalize,
            reduction=reduction)
        comm, name = start_call("distill_info_nce", mode, group, backend, student_query.device,
                                student_query.dtype)
    table = exchange(comm, student_query.device, [
        (None, student_query.shape[0]), (None, student_key.shape[0]),
        ("the feature dimension D of student_query", student_query.shape[1]),
        ("the teacher's feature dimension DT of teacher_query", teacher_query.shape[1]),
        ("dtype of student_query", dtype_code(student_query.dtype)),
        ("the options symmetric / normalize", int(symmetric) | int(normalize) << 1),
        ("mode", mode_code(mode)), ("reduction", REDUCTIONS.index(reduction)),
        ("teacher_temperature", float_code(float(teacher_tau)))])
    n_rows, n_keys = [r[0] for r in table], [r[1] for r in table]
    acc = accumulate_dtype(student_query.dtype)
    cdt = compute_dtype(name, student_query.dtype)
    sq, sk = (prepare(t, acc, normalize).to(cdt) for t in (student_query, student_key))
    with torch.no_grad():
        tq, tk = (prepare(t, acc, normalize).to(cdt) for t in (teacher_query, teacher_key))
    loss = DistributedDistill.apply(sq, sk, tq, tk, tau.reciprocal().to(acc),
                                    teacher_tau.reciprocal().detach().to(acc), comm,
                                    tuple(n_keys), symmetric, mode, name)
    return group_reduce(comm, loss, reduction, sum(n_rows))
