"""Distributed cases of label smoothing (fastcontrast/distributed/label_smoothing.py): each
loss with label_smoothing over every rank against the single-process loss on the whole batch
(run by _workers.py like its other cases)."""

EPS = 0.2
NAMES = ["info_nce_ls", "info_nce_ls_global_targets", "info_nce_ls_ids_bank",
         "info_nce_ls_symmetric", "clip_loss_ls", "nt_xent_ls", "moco_loss_ls"]


def label_smoothing_cases(fc, fcd, ref, dst, builders):
    """Case objects for NAMES; ``builders``: _workers' input builders by name (plain, targets,
    ids, clip, moco)."""
    from ._workers import Case, _ids, _nt_xent_rows, _queue

    def info_nce(name, build, **options):
        return Case(
            name, build,
            lambda x, red, mode, grp: fcd.info_nce(
                x["query"], x["key"], x.get("bank"), temperature=x["tau"],
                targets=x.get("targets"), reduction=red, mode=mode, group=grp,
                label_smoothing=EPS, **_ids(x, options), **dst),
            lambda x, red: fc.info_nce(x["query"], x["key"], x.get("bank"), temperature=x["tau"],
                                       targets=x.get("targets"), reduction=red,
                                       label_smoothing=EPS, **_ids(x, options), **ref))

    return [
        info_nce("info_nce_ls", builders["plain"]),
        info_nce("info_nce_ls_global_targets", builders["targets"]),
        info_nce("info_nce_ls_ids_bank", builders["ids"]),
        info_nce("info_nce_ls_symmetric", builders["plain"], symmetric=True),
        Case("clip_loss_ls", builders["clip"],
             lambda x, red, mode, grp: fcd.clip_loss(
                 x["query"], x["key"], x["scale"], logit_bias=x["bias"], reduction=red,
                 label_smoothing=EPS, mode=mode, group=grp, **dst),
             lambda x, red: fc.clip_loss(x["query"], x["key"], x["scale"], logit_bias=x["bias"],
                                         reduction=red, label_smoothing=EPS, **ref)),
        Case("nt_xent_ls", builders["plain"],
             lambda x, red, mode, grp: fcd.nt_xent(
                 x["query"], x["key"], temperature=x["tau"], reduction=red,
                 label_smoothing=EPS, mode=mode, group=grp, **dst),
             lambda x, red: fc.nt_xent(x["query"], x["key"], temperature=x["tau"],
                                       reduction=red, label_smoothing=EPS, **ref),
             none_rows=_nt_xent_rows),
        Case("moco_loss_ls", builders["moco"],
             lambda x, red, mode, grp: fcd.moco_loss(
                 x["query"], x["key"], _queue(x), temperature=x["tau"], reduction=red,
                 query_index=x["query_index"], label_smoothing=EPS, mode=mode, group=grp,
                 **dst),
             lambda x, red: fc.moco_loss(x["query"], x["key"], _queue(x), temperature=x["tau"],
                                         reduction=red, query_index=x["query_index"],
                                         label_smoothing=EPS, **ref)),
    ]


