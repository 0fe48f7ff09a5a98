"""Distributed cases of similarity distillation (fastcontrast/distributed/distill.py): the
student over the keys of every rank against fastcontrast.distill_info_nce on the whole batch,
in both modes, run by _workers.py like its other cases."""
NAMES = ["distill_symmetric", "distill_one_way_uneven_keys", "distill_raw_features"]
DT = 5  # the teacher's feature dimension (differs from the student's)


def _teacher(build):
    """``build`` plus teacher rows with the shards of the student's (no gradient)."""
    from ._workers import _randn

    def built(gen, sizes):
        g, s, diff = build(gen, sizes)
        for name, like in (("tq", "query"), ("tk", "key")):
            g[name], s[name] = _randn(gen, g[like].shape[0], DT), s[like]
        return g, s, diff

    return built


def distill_cases(fc, fcd, ref, dst, builders):
    """Case objects for NAMES; ``builders``: plain, targets (two keys per
    row: uneven key shards)."""
    from ._workers import Case

    def case(name, build, **options):
        out = Case(
            name, _teacher(build),
            lambda x, red, mode, grp: fcd.distill_info_nce(
                x["query"], x["key"], x["tq"], x["tk"], temperature=x["tau"],
                teacher_temperature=0.2, reduction=red, mode=mode, group=grp, **options, **dst),
            lambda x, red: fc.distill_info_nce(
                x["query"], x["key"], x["tq"], x["tk"], temperature=x["tau"],
                teacher_temperature=0.2, reduction=red, **options, **ref))
        return out

    return [case("distill_symmetric", builders["plain"]),
            case("distill_one_way_uneven_keys", builders["targets"], symmetric=False),
            case("distill_raw_features", builders["plain"], normalize=False)]

