"""Similarity distillation over the keys of every rank: fastcontrast.distill_info_nce on the
concatenated batch (the formulas are fastcontrast/distill.py's),

    loss_i = sum_j p^T_ij (lse^S_i - s^S_ij),  p^T_ij = softmax_j(t_ij),  j over every rank's keys
    symmetric (N_r == M_r on every rank): loss_i = (row_i + col_i) / 2, col_i over every rank's
    queries

Gather mode: the student keys are all-gathered with autograd (each rank's keys get the gradient
of every rank's losses, as the other distributed losses), the teacher's without (it gets no
gradient), and this rank's rows run through the single-process fused kernels against all of
them (memory: O(M_total (D + DT)) per rank for the gathered features; the score matrices stay
in tiles). The symmetric loss runs the column direction the same way: this rank's keys against
every rank's queries. Ring mode is not implemented yet: NotImplementedError.
"""
from .. import _loss_args as args
from .. import _validation as check
from .._host import REDUCTIONS
from .._loss_args import output_dtype_policy
from ..distill import distill_fused_loss
from .calls import MODES, exchange, float_code, group_reduce, mode_code, refusal, start_call
from .collectives import AllGatherWithGrad, all_gather_rows, dtype_code

__all__ = ["distill_info_nce"]


def _all_rows(comm, t, sizes, with_grad):
    if with_grad:
        return AllGatherWithGrad.apply(t, comm, tuple(sizes))
    return all_gather_rows(comm, t.detach().contiguous(), sizes)


@output_dtype_policy
def distill_info_nce(student_query, student_key, teacher_query, teacher_key, *, temperature,
                     teacher_temperature, symmetric=True, normalize=True, reduction="mean",
                     backend="auto", mode="gather", group=None):
    """fastcontrast.distill_info_nce over the keys of every rank of ``group`` (see
    fastcontrast.distributed for the convention). Each rank passes its share: student_query
    (N_r, D), student_key (M_r, D), teacher_query (N_r, DT), teacher_key (M_r, DT); symmetric
    needs N_r == M_r on every rank. The teacher (features and temperature) gets no gradient;
    the student temperature's gradient is this rank's share (DDP averages it). "none": this
    rank's rows. ``mode``: "gather" only for now ("ring": NotImplementedError)."""
    check.check_choice("mode", mode, MODES)
    if mode == "ring":  # the same call on every rank: every rank raises
        raise NotImplementedError("fastcontrast.distributed.distill_info_nce does not take "
                                  "mode='ring' yet; use mode='gather'")
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
    scales = dict(s_scale=tau.reciprocal(), t_scale=teacher_tau.reciprocal())

    def direction(rows, teacher_rows, keys, teacher_keys, sizes):
        return distill_fused_loss(rows, _all_rows(comm, keys, sizes, True), teacher_rows,
                                  _all_rows(comm, teacher_keys, sizes, False), **scales,
                                  symmetric=False, normalize=normalize, reduction="none",
                                  backend=name)

    loss = direction(student_query, teacher_query, student_key, teacher_key, n_keys)
    if symmetric:  # this rank's keys against every rank's queries
        column = direction(student_key, teacher_key, student_query, teacher_query, n_rows)
        loss = 0.5 * (loss + column)
    return group_reduce(comm, loss, reduction, sum(n_rows))

