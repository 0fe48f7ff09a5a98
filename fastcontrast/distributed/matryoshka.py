"""Matryoshka prefixes over the keys of every rank (fastcontrast/infonce/matryoshka.py on the
concatenated batch): the weighted sum over leading-dimension prefixes d_1 < ... < d_P of the
distributed loss on the first d_p features,

    loss = sum_p w_p loss(q[:, :d_p], k[:, :d_p])        (w_p = 1 by default),

each prefix L2-normalised on its own when the loss normalises (info_nce, nt_xent; clip_loss
takes the prefixes as given). The group convention holds per prefix, so it holds for the sum.

Across ranks this runs the distributed pass once per prefix (P metadata exchanges, P passes
over the keys of every rank, each moving d_p of the D features): correct, but not the single
pass over the key tiles that the single-process loss makes (matryoshka_ops.py). The options
that single-process Matryoshka refuses are refused here with the same NotImplementedError."""
from ..infonce.matryoshka import matryoshka_unsupported

__all__ = ["check_matryoshka", "prefix_sum"]


def check_matryoshka(options, negatives=None, query_ids=None, labels=(None, None)):
    """The single-process refusal (infonce.matryoshka.matryoshka_unsupported), raised before any
    communication: every rank makes the same call, so every rank raises."""
    error = matryoshka_unsupported(options, negatives, query_ids, labels)
    if error is not None:
        raise error


def prefix_sum(dims, weights, loss_at):
    """sum_p w_p loss_at(cut_p), cut_p(t) the first d_p features of t (None stays None): one
    distributed loss per prefix, each with its own exchange, normalisation and pass."""
    total = None
    for d, w in zip(dims, weights):
        def cut(t, d=d):
            return None if t is None else t[..., :d]
        loss = w * loss_at(cut)
        total = loss if total is None else total + loss
    return total
