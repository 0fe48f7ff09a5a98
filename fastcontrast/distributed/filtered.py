"""The false-negative filter's side of the public distributed losses (api.py): the local checks
of its options (those of fastcontrast._false_negative_args, refusing what the single-process
loss refuses) and the filtered InfoNCE over the keys of every rank, a symmetric loss (CLIP) as
two one-directional passes, each filtered with its own positive (as single-process:
fastcontrast/infonce/false_negatives.py), loss = (rows + columns) / 2.

With ``return_dropped`` the loss comes with int64 counts of the candidates of EVERY rank that
the filter dropped for this rank's rows: (N_r,), symmetric (2, N_r) (row 0 query -> key, row 1
key -> query), as single-process on this rank's rows of the concatenated batch.
"""
from dataclasses import replace

import torch

from .._false_negative_args import false_negative_args
from .global_infonce import global_info_nce

__all__ = ["info_nce_filter", "clip_filter", "moco_filter", "filtered_info_nce"]


def info_nce_filter(query, key, negatives, *, exclude_self, symmetric, objectives,
                    label_smoothing, labels, matryoshka, false_negative_margin, guide,
                    guide_margin, guide_margin_strategy, return_dropped):
    """The FalseNegatives filter of a distributed info_nce call, or None (local checks; the
    guide rows are this rank's: guide_query (N_r, G), guide_key (M_r, G), guide_negatives
    (K_r, G) with a bank). ``objectives``: DCL / DCLW / HCL options given."""
    bank = negatives is not None and negatives.dim() == 2
    rows = [("query", query.shape[0], query.device), ("key", key.shape[0], query.device)]
    if bank:
        rows.append(("negatives", negatives.shape[0], query.device))
    return false_negative_args(
        false_negative_margin, guide, guide_margin, guide_margin_strategy, return_dropped,
        guide_names=("guide_query", "guide_key", "guide_negatives")[:len(rows)], guide_rows=rows,
        conflicts=(("exclude_self", exclude_self),
                   ("decoupled / dclw_sigma / hcl options", objectives),
                   ("label_smoothing", label_smoothing != 0),
                   ("query_labels / key_labels", labels),
                   ("per-query negatives (N, K, D)", negatives is not None and not bank),
                   ("matryoshka_dims", matryoshka),
                   ("symmetric=True and negatives", symmetric and negatives is not None)))


def clip_filter(image, text, *, label_smoothing, labels, matryoshka, false_negative_margin,
                guide, guide_margin, guide_margin_strategy, return_dropped):
    """The FalseNegatives filter of a distributed clip_loss call, or None: guide =
    (guide_image (N_r, G), guide_text (N_r, G))."""
    rows = [("image", image.shape[0], image.device), ("text", text.shape[0], image.device)]
    return false_negative_args(
        false_negative_margin, guide, guide_margin, guide_margin_strategy, return_dropped,
        guide_names=("guide_image", "guide_text"), guide_rows=rows,
        conflicts=(("label_smoothing", label_smoothing != 0), ("labels", labels),
                   ("matryoshka_dims", matryoshka)))


def moco_filter(query, key, queue, *, objectives, label_smoothing, false_negative_margin, guide,
                guide_margin, guide_margin_strategy, return_dropped):
    """The FalseNegatives filter of a distributed moco_loss call, or None: guide =
    (guide_query (N_r, G), guide_key (N_r, G), guide_queue (K, G), the queue's as every rank
    holds it). ``objectives``: DCL / HCL options given."""
    rows = [("query", query.shape[0], query.device), ("key", key.shape[0], query.device),
            ("queue", queue.shape[0], query.device)]
    return false_negative_args(
        false_negative_margin, guide, guide_margin, guide_margin_strategy, return_dropped,
        guide_names=("guide_query", "guide_key", "guide_queue"), guide_rows=rows,
        conflicts=(("decoupled / hcl options", objectives),
                   ("label_smoothing", label_smoothing != 0)))


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
