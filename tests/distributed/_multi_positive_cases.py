"""Distributed cases of multiple positives (fastcontrast/distributed/multi_positive.py): each
loss with labels over every rank against the single-process loss on the whole batch (run by
_workers.py like its other cases). Labels in [0, 3) plus one query label no key has (a row
without a positive, left out of the mean); symmetric: also a key whose label no query has."""

NAMES = ["info_nce_labels", "info_nce_labels_uneven_keys", "info_nce_labels_symmetric",
         "info_nce_labels_exclude_self", "info_nce_labels_ids_bank",
         "info_nce_labels_per_query_negatives", "clip_loss_labels"]


def _with_labels(build, keys_per_row=1, lonely_key=False):
    """``build`` plus query_labels / key_labels sharded with the rows / keys."""
    import torch

    from ._workers import _rows

    def labelled(gen, sizes):
        g, s, diff = build(gen, sizes)
        n = sum(sizes)
        g["query_labels"] = torch.randint(0, 3, (n,), generator=gen)
        g["query_labels"][n // 2] = 99  # no key of any rank has it
        g["key_labels"] = torch.randint(0, 3, (keys_per_row * n,), generator=gen)
        if lonely_key:
            g["key_labels"][0] = 98  # no query of any rank has it (the column direction)
        s["query_labels"], s["key_labels"] = _rows(sizes), _rows(sizes, keys_per_row)
        return g, s, diff

    return labelled


def multi_positive_cases(fc, fcd, ref, dst, builders):
    """Case objects for NAMES; ``builders``: _workers' input builders by name (plain, targets
    (two keys per row), ids, clip)."""
    from ._workers import Case, _ids, _randn, _rows

    def info_nce(name, build, **options):
        def labels(x):
            key = x["query"] if options.get("exclude_self") else x["key"]
            own = x["query_labels"] if options.get("exclude_self") else x["key_labels"]
            return key, dict(_ids(x, options), query_labels=x["query_labels"], key_labels=own)

        def run(fn, x, red, **extra):
            key, kw = labels(x)
            negatives = x.get("bank", x.get("negatives"))
            return fn(x["query"], key, negatives, temperature=x["tau"], reduction=red, **kw,
                      **extra)

        return Case(name, build,
                    lambda x, red, mode, grp: run(fcd.info_nce, x, red, mode=mode, group=grp,
                                                  **dst),
                    lambda x, red: run(fc.info_nce, x, red, **ref))

    def uneven_keys(gen, sizes):  # two keys per row: M_r = 2 N_r, no targets
        g, s, _ = builders["targets"](gen, sizes)
        del g["targets"], s["targets"]
        return g, s, ("query", "key", "tau")

    def per_query(gen, sizes):  # (N, K, D) negatives stay with their rows
        g, s, _ = builders["plain"](gen, sizes)
        g["negatives"], s["negatives"] = _randn(gen, sum(sizes), 3, g["query"].shape[1]), \
            _rows(sizes)
        return g, s, ("query", "key", "negatives", "tau")

    def clip_labels(gen, sizes):
        g, s, diff = _with_labels(builders["clip"])(gen, sizes)
        g["labels"], s["labels"] = g.pop("key_labels"), s.pop("key_labels")
        del g["query_labels"], s["query_labels"]
        return g, s, diff

    return [
        info_nce("info_nce_labels", _with_labels(builders["plain"])),
        info_nce("info_nce_labels_uneven_keys", _with_labels(uneven_keys, keys_per_row=2)),
        info_nce("info_nce_labels_symmetric", _with_labels(builders["plain"], lonely_key=True),
                 symmetric=True),
        info_nce("info_nce_labels_exclude_self", _with_labels(builders["plain"]),
                 exclude_self=True),
        info_nce("info_nce_labels_ids_bank", _with_labels(builders["ids"])),
        info_nce("info_nce_labels_per_query_negatives", _with_labels(per_query)),
        Case("clip_loss_labels", clip_labels,
             lambda x, red, mode, grp: fcd.clip_loss(
                 x["query"], x["key"], x["scale"], logit_bias=x["bias"], reduction=red,
                 labels=x["labels"], mode=mode, group=grp, **dst),
             lambda x, red: fc.clip_loss(x["query"], x["key"], x["scale"], logit_bias=x["bias"],
                                         reduction=red, labels=x["labels"], **ref)),
    ]
