"""Distributed cases of similarity distillation (fastcontrast/distributed/distill.py): the
student over the keys of every rank against fastcontrast.distill_info_nce on the whole batch,
in gather mode (ring mode is refused: ``run_distill_ring_refused``), run by _workers.py like its
other cases."""
import torch

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
    """Case objects for NAMES (gather mode only); ``builders``: plain, targets (two keys per
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
        out.modes = ("gather",)
        return out

    return [case("distill_symmetric", builders["plain"]),
            case("distill_one_way_uneven_keys", builders["targets"], symmetric=False),
            case("distill_raw_features", builders["plain"], normalize=False)]


def run_distill_ring_refused(group, out, tag):
    """``refused/{tag}distill_ring``: the NotImplementedError's message (every rank raises)."""
    from fastcontrast import distributed as fcd

    x = torch.randn(3, 4, dtype=torch.float64)
    try:
        fcd.distill_info_nce(x, x, x, x, temperature=0.1, teacher_temperature=0.1, mode="ring",
                             group=group)
        out[f"refused/{tag}distill_ring"] = "no error"
    except NotImplementedError as e:
        out[f"refused/{tag}distill_ring"] = str(e)
