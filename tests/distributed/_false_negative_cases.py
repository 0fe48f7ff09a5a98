"""Distributed cases of false-negative filtering (fastcontrast/distributed/false_negatives.py):
info_nce / clip_loss / moco_loss with a margin and / or a guide over every rank against the
single-process loss on the whole batch (run by _workers.py like its other cases), and
``run_dropped_counts``: the return_dropped counts of each rank's rows against the
single-process counts of those rows."""
import torch

MARGIN = 0.1
G = 4  # the guide's feature dimension
NAMES = ["info_nce_fn_margin", "info_nce_fn_guide_global_targets", "info_nce_fn_bank_guide",
         "info_nce_fn_bank_only", "info_nce_fn_ids_bank", "info_nce_fn_symmetric",
         "clip_loss_fn", "clip_loss_fn_guide_relative", "moco_loss_fn"]


def _with_guide(build, *, bank_sizes=None, queue=False):
    """``build`` plus guide rows: gq with the queries' shards, gk with the keys', gb with the
    bank's (``bank_sizes``), gqueue replicated (``queue``)."""
    from ._workers import _randn, _rows

    def built(gen, sizes):
        g, s, diff = build(gen, sizes)
        for name, like in (("gq", "query"), ("gk", "key")):
            g[name], s[name] = _randn(gen, g[like].shape[0], G), s[like]
        if bank_sizes is not None:
            g["gb"], s["gb"] = _randn(gen, g["bank"].shape[0], G), _rows(bank_sizes[:len(sizes)])
        if queue:
            g["gqueue"], s["gqueue"] = _randn(gen, g["queue"].shape[0], G), None
        return g, s, diff

    return built


def _guide(x):
    if "gq" not in x:
        return {}
    extra = [x[n] for n in ("gb", "gqueue") if n in x]
    return {"guide": (x["gq"], x["gk"], *extra)}


class FilterCase:
    """A _workers.Case whose functions also take return_dropped (run_dropped_counts)."""

    def __init__(self, name, build, dist_fn, ref_fn):
        from ._workers import Case

        self.name, self.build, self.dist_fn, self.ref_fn = name, build, dist_fn, ref_fn
        self.case = Case(name, build, lambda x, red, mode, grp: dist_fn(x, red, mode, grp, False),
                         lambda x, red: ref_fn(x, red, False))


def false_negative_cases(fc, fcd, ref, dst, builders):
    """FilterCase objects for NAMES; ``builders``: _workers' input builders by name (plain,
    targets, bank, ids, clip, moco)."""
    from ._workers import _ids, _queue

    def case(name, build, function, call):
        """FilterCase of fc / fcd's ``function`` called as call(f, x, red, more, rd)."""
        return FilterCase(name, build,
                          lambda x, red, mode, grp, rd: call(
                              getattr(fcd, function), x, red, dict(mode=mode, group=grp, **dst),
                              rd),
                          lambda x, red, rd: call(getattr(fc, function), x, red, ref, rd))

    def info_nce(name, build, **options):
        def call(f, x, red, more, rd):
            return f(x["query"], x["key"], x.get("bank"), temperature=x["tau"],
                     targets=x.get("targets"), reduction=red, return_dropped=rd,
                     **_ids(x, options), **_guide(x), **more)
        return case(name, build, "info_nce", call)

    def clip(name, **options):
        def call(f, x, red, more, rd):
            return f(x["query"], x["key"], x["scale"], logit_bias=x["bias"], reduction=red,
                     return_dropped=rd, **_guide(x), **options, **more)
        return case(name, _with_guide(builders["clip"]), "clip_loss", call)

    def moco(f, x, red, more, rd):
        return f(x["query"], x["key"], _queue(x), temperature=x["tau"], reduction=red,
                 query_index=x["query_index"], return_dropped=rd, **_guide(x),
                 false_negative_margin=MARGIN, guide_margin=0.1,
                 guide_margin_strategy="relative", **more)

    bank_sizes = [2, 1, 3, 2]
    return [
        info_nce("info_nce_fn_margin", builders["plain"], false_negative_margin=MARGIN),
        info_nce("info_nce_fn_guide_global_targets", _with_guide(builders["targets"]),
                 guide_margin=0.05),
        info_nce("info_nce_fn_bank_guide", _with_guide(builders["bank"], bank_sizes=bank_sizes),
                 false_negative_margin=MARGIN, guide_margin_strategy="relative",
                 guide_margin=0.2),
        info_nce("info_nce_fn_bank_only", builders["bank"], false_negative_margin=0.0,
                 in_batch_negatives=False),
        info_nce("info_nce_fn_ids_bank", builders["ids"], false_negative_margin=MARGIN),
        info_nce("info_nce_fn_symmetric", _with_guide(builders["plain"]), symmetric=True,
                 false_negative_margin=MARGIN),
        clip("clip_loss_fn", false_negative_margin=MARGIN, guide_margin=0.05),
        # the symmetric pass with the guide alone, "relative": column thresholds of the guide
        clip("clip_loss_fn_guide_relative", guide_margin=0.1, guide_margin_strategy="relative"),
        case("moco_loss_fn", _with_guide(builders["moco"], queue=True), "moco_loss", moco),
    ]


def run_dropped_counts(group, out, tag, cases, seed):
    """``{tag}{name}/dropped/{mode}``: 0 when this rank's counts (and loss) equal the
    single-process ones of its rows, else the largest difference;
    ``dropped_total/{tag}{name}``: the dropped candidates of the whole batch (some must be)."""
    import torch.distributed as dist

    from ._workers import MODES, SIZES, _err, _local

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = SIZES[:world]
    rows = torch.arange(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    for i, case in enumerate(cases):
        gen = torch.Generator().manual_seed(seed + i)
        glob, shards, _ = case.build(gen, sizes)
        want_loss, want = case.ref_fn(glob, "sum", True)
        out[f"dropped_total/{tag}{case.name}"] = int(want.sum())
        for mode in MODES:
            key = f"{tag}{case.name}/dropped/{mode}"
            try:
                loss, got = case.dist_fn(_local(glob, shards, (), rank), "sum", mode, group, True)
                total = torch.tensor([float(loss)], dtype=torch.float64)
                dist.all_reduce(total, group=group)
                out[key] = max(float((got - want[..., rows]).abs().max()),
                               _err(total[0] / world, want_loss.detach()))
            except Exception:  # noqa: BLE001  (reported to the test, which fails on it)
                import traceback
                out[f"{key}/error"] = traceback.format_exc()
