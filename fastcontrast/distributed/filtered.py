"""The false-negative filter's side of the public distributed losses (api.py; its options are
checked by fastcontrast._false_negative_args, as single-process): the filtered InfoNCE over the
keys of every rank. A symmetric loss (CLIP) runs ONE pass, as single-process
(fastcontrast/infonce/false_negatives.py) and as the unfiltered distributed symmetric loss:
each tile of every rank's rows against every rank's keys is computed once, entry (i, j) leaves
row i's log-sum-exp by row i's rule and column j's by column j's (column j's positive is row j,
its thresholds row j's, travelling with the key block: false_negatives.RowFilter), the column
log-sum-exps merged across ranks as without a filter; loss = (rows + columns) / 2.

With ``return_dropped`` the loss comes with int64 counts of the candidates of EVERY rank that
the filter dropped for this rank's rows: (N_r,), symmetric (2, N_r) (row 0 query -> key, row 1
key -> query: the queries of every rank dropped for this rank's keys), as single-process on
this rank's rows of the concatenated batch.
"""
from .global_infonce import global_info_nce

__all__ = ["filtered_info_nce"]


def filtered_info_nce(comm, options, mode, query, key, negatives, scale, targets, query_ids,
                      negative_ids, fn, return_dropped, names=("query", "key")):
    """global_info_nce with FalseNegatives ``fn``, one pass in both directions when symmetric
    (no targets, no negatives: validated). ``names``: the caller's names of query and key."""
    return global_info_nce(comm, options, mode, query, key, negatives, scale, targets,
                           query_ids, negative_ids, q_name=names[0], false_negatives=fn,
                           return_dropped=return_dropped)
