"""PNG plots of a ``fastcontrast bench`` result (matplotlib, the ``bench`` extra).

One figure per (dtype, D); one row per loss family; three panels per row:
  forward+backward time against N (log-log), peak extra memory against N (log-log), and the
  time over the matmul floor against N. One line per implementation; OOM and TIMEOUT are drawn
  as labelled markers at the N where the implementation fell over, WRONG as a red cross.
Timed cases are medians; the largest-N search's runs are single cold runs (hollow markers).
"""
import os

FAILED = {"OOM": ("v", "OOM"), "TIMEOUT": ("s", "TIMEOUT"), "WRONG": ("X", "WRONG"),
          "ERROR": ("X", "ERROR"), "CRASH": ("X", "CRASH")}
MiB = 1 << 20


def _series(records, impl):
    """(points [(n, time, memory, floor ratio, measured)], failures [(n, status)])."""
    points, failures = [], []
    for r in records:
        if r["impl"] != impl or r.get("inferred"):
            continue
        if r["status"] == "OK":
            time = r.get("median_s") if r.get("mode") == "time" else r.get("cold_s")
            points.append((r["n"], time, r.get("peak_extra_bytes"), r.get("time_over_floor"),
                           r.get("mode") == "time"))
        elif r["status"] in FAILED:
            failures.append((r["n"], r["status"]))
    return sorted(points), sorted(failures)


def plot_group(result, dtype, d, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in result["records"] if r["dtype"] == dtype and r["d"] == d]
    families = list(dict.fromkeys(r["family"] for r in records))
    impls = list(dict.fromkeys(r["impl"] for r in records if r["status"] != "SKIPPED"))
    colors = {impl: plt.get_cmap("tab10")(i % 10) for i, impl in enumerate(impls)}
    fig, axes = plt.subplots(len(families), 3, figsize=(16, 4.2 * len(families)), squeeze=False)
    machine = result["machine"].get("gpu") or result["machine"]["cpu"]
    budget = result["config"]["search_budget"] or result["config"]["budget"]
    fig.suptitle(f"fastcontrast bench ({result['config']['suite']}): forward+backward, {dtype}, "
                 f"D = {d}, on {machine}, {result['machine']['torch_threads']} threads\n"
                 f"filled: median of timed runs; hollow: single run of the largest-N search "
                 f"(memory budget {budget}); triangles / squares: out of memory / out of time",
                 fontsize=11)
    for row, family in zip(axes, families):
        fam_records = [r for r in records if r["family"] == family]
        title = result["titles"].get(family, family)
        panels = ((1, "time (s)", "forward+backward time"),
                  (2, "peak extra memory (MiB)", "peak extra memory"),
                  (3, "time / matmul floor", "time / matmul floor"))
        for ax, (index, ylabel, what) in zip(row, panels):
            for impl in impls:
                points, failures = _series(fam_records, impl)
                # A log axis cannot show 0 (a peak below the page granularity): left out.
                shown = [p for p in points if p[index] is not None and (index == 3 or p[index] > 0)]
                xs = [p[0] for p in shown]
                ys = [p[index] / MiB if index == 2 else p[index] for p in shown]
                filled = [p[4] for p in shown]
                if xs:
                    ax.plot(xs, ys, "-", color=colors[impl], label=impl, alpha=0.8)
                    for x, y, full in zip(xs, ys, filled):
                        ax.plot([x], [y], "o", color=colors[impl],
                                markerfacecolor=colors[impl] if full else "white")
                height = 0.95 - 0.07 * impls.index(impl)  # one band per implementation
                for n, status in failures:
                    marker, text = FAILED[status]
                    ax.plot([n], [height], marker, color=colors[impl], markersize=8,
                            transform=ax.get_xaxis_transform(), label=None if xs else impl)
                    ax.annotate(text, (n, height), xycoords=ax.get_xaxis_transform(),
                                textcoords="offset points", xytext=(7, -3), fontsize=7,
                                color=colors[impl])
            ns = sorted({r["n"] for r in fam_records})
            ax.set_xscale("log", base=2)
            ax.set_xlim(ns[0] / 1.5, ns[-1] * 1.5)
            if index != 3:
                if any(line.get_ydata().size for line in ax.get_lines()
                       if line.get_transform() == ax.transData):
                    ax.set_yscale("log")  # (not on a panel of failure markers alone)
            else:
                ax.axhline(1.0, color="gray", lw=0.8, ls=":")
            ax.set_xlabel("N (rows of the similarity matrix)")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{title}: {what}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        row[0].legend(fontsize=8, loc="best")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(result, out_dir):
    """One PNG per (dtype, D) of the result; returns their paths ([] without matplotlib)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    keys = dict.fromkeys((r["dtype"], r["d"]) for r in result["records"]
                         if r["status"] != "SKIPPED")
    return [plot_group(result, dtype, d, os.path.join(out_dir, f"bench_{dtype}_d{d}.png"))
            for dtype, d in keys]
