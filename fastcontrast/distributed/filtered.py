"""The false-negative filter's side of the public distributed losses (api.py; its options are
checked by fastcontrast._false_negative_args, as single-process): the filtered InfoNCE over the
keys of every rank, a symmetric loss (CLIP) as
two one-directional passes, each filtered with its own positive (single-process runs the same
rule in one symmetric pass: fastcontrast/infonce/false_negatives.py), loss = (rows + columns) / 2.

With ``return_dropped`` the loss comes with int64 counts of the candidates of EVERY rank that
the filter dropped for this rank's rows: (N_r,), symmetric (2, N_r) (row 0 query -> key, row 1
key -> query), as single-process on this rank's rows of the concatenated batch.
"""
from dataclasses import replace

import torch

from .global_infonce import global_info_nce

__all__ = ["filtered_info_nce"]


def filtered_info_nce(comm, options, mode, query, key, negatives, scale, targets, query_ids,
                      negative_ids, fn, return_dropped, names=("query", "key")):
    """global_info_nce with FalseNegatives ``fn``; symmetric: the mean of the two directions
    (no targets, no negatives: validated). ``names``: the caller's names of query and key."""
    if not options.symmetric:
        return global_info_nce(comm, options, mode, query, key, negatives, scale, targets,
                               query_ids, negative_ids, q_name=names[0], false_negatives=fn,
                               return_dropped=return_dropped)
    one_way = replace(options, symmetric=False)
    outs = [global_info_nce(comm, one_way, mode, q, k, None, scale, None, q_name=name,
                            false_negatives=f, return_dropped=return_dropped)
            for q, k, f, name in ((query, key, fn, names[0]),
                                  (key, query, fn.transposed(), names[1]))]
    if not return_dropped:
        return 0.5 * (outs[0] + outs[1])
    return 0.5 * (outs[0][0] + outs[1][0]), torch.stack([outs[0][1], outs[1][1]])
