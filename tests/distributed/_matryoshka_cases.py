"""Distributed cases of Matryoshka prefixes (fastcontrast/distributed/matryoshka.py): each loss
with matryoshka_dims / matryoshka_weights over every rank against the single-process loss on
the whole batch (run by _workers.py like its other cases; D = 6)."""

NAMES = ["info_nce_mrl", "info_nce_mrl_global_targets", "info_nce_mrl_bank",
         "info_nce_mrl_exclude_self", "info_nce_mrl_symmetric", "clip_loss_mrl", "nt_xent_mrl"]
WEIGHTED = dict(matryoshka_dims=(2, 4, 6), matryoshka_weights=(1.0, 0.5, 2.0))
SHORT = dict(matryoshka_dims=(3, 5))  # the full D is not a prefix; default weights


def matryoshka_cases(fc, fcd, ref, dst, builders):
    """Case objects for NAMES; ``builders``: _workers' input builders by name (plain, targets,
    bank, clip)."""
    import torch

    from ._workers import Case, _nt_xent_rows, _rows

    def info_nce(name, build, **options):
        return Case(
            name, build,
            lambda x, red, mode, grp: fcd.info_nce(
                x["query"], x["key"], x.get("bank"), temperature=x["tau"],
                targets=x.get("targets"), reduction=red, mode=mode, group=grp, **options,
                **dst),
            lambda x, red: fc.info_nce(x["query"], x["key"], x.get("bank"), temperature=x["tau"],
                                       targets=x.get("targets"), reduction=red, **options,
                                       **ref))

    def exclude_self(gen, sizes):  # one set: each row's positive another row of any rank
        g, s, diff = builders["plain"](gen, sizes)
        n = sum(sizes)
        g["key"] = g["query"]
        g["targets"] = (torch.arange(n) + torch.randint(1, n, (n,), generator=gen)) % n
        s["targets"] = _rows(sizes)
        return g, s, diff

    return [
        info_nce("info_nce_mrl", builders["plain"], **WEIGHTED),
        info_nce("info_nce_mrl_global_targets", builders["targets"], **SHORT),
        info_nce("info_nce_mrl_bank", builders["bank"], **WEIGHTED),
        info_nce("info_nce_mrl_exclude_self", exclude_self, exclude_self=True, **WEIGHTED),
        info_nce("info_nce_mrl_symmetric", builders["plain"], symmetric=True, **SHORT),
        Case("clip_loss_mrl", builders["clip"],
             lambda x, red, mode, grp: fcd.clip_loss(
                 x["query"], x["key"], x["scale"], logit_bias=x["bias"], reduction=red,
                 mode=mode, group=grp, **WEIGHTED, **dst),
             lambda x, red: fc.clip_loss(x["query"], x["key"], x["scale"], logit_bias=x["bias"],
                                         reduction=red, **WEIGHTED, **ref)),
        Case("nt_xent_mrl", builders["plain"],
             lambda x, red, mode, grp: fcd.nt_xent(
                 x["query"], x["key"], temperature=x["tau"], reduction=red, mode=mode,
                 group=grp, matryoshka_dims=(3, 6), matryoshka_weights=(0.5, 1.0), **dst),
             lambda x, red: fc.nt_xent(x["query"], x["key"], temperature=x["tau"],
                                       reduction=red, matryoshka_dims=(3, 6),
                                       matryoshka_weights=(0.5, 1.0), **ref),
             none_rows=_nt_xent_rows),
    ]
