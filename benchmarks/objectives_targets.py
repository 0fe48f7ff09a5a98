"""The fused objectives against the plain fused loss and the materialised formulation in plain
PyTorch: forward+backward time (interleaved rounds, paired ratios) and peak extra memory (each in
a fresh process), N = M = 16384, D = 256, fp32 by default.

    python -m benchmarks.objectives_targets [--n 16384] [--dim 256] [--repeats 5] [--out DIR]

Targets (per objective): time <= 1.15x the plain fused loss, >= 2x faster than the materialised
formulation, extra memory < 3% of the materialised one's. Objectives measured: label smoothing
(info_nce and clip_loss, eps = 0.1), multiple positives (info_nce with query / key labels,
clip_loss with labels; 4096 classes, so most rows have several positives), false-negative
filtering (info_nce and clip_loss with false_negative_margin = 0.1, info_nce with a guide of
the same D, margin 0), Matryoshka (info_nce with matryoshka_dims (32, 64, 128, 256) at D = 256,
scaled with --dim: target <= 1.3x the single full-D fused loss; also timed: the separate fused
calls per prefix, "separate", and the materialised sum) and similarity distillation
(distill_info_nce one direction against info_nce, and symmetric with CLIP's temperatures
against clip_loss, whose materialised form is OpenCLIP's DistillClipLoss term; target 2.3x: it
computes two score matrices).

The symmetric distillation row also times OpenCLIP's own ``open_clip.loss.DistillClipLoss``
(when open-clip-torch is installed, else skipped with the reason), like for like: the class
returns (contrastive loss, distillation loss) from one pair of materialised logits, so it is
timed on their sum ("open_clip", both terms) against the fused equivalent of that sum,
distill_clip_loss (both terms in one fused pass, "objective+clip"): speedup_vs_open_clip is
open_clip / objective+clip. The two losses called apart, clip_loss(...) +
distill_info_nce(..., symmetric=True), are timed too ("clip+distill apart"). Its distillation
term alone is what "materialised" computes (the same dist_loss formula) against "objective"
(distill_info_nce alone).
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: the checkout's fastcontrast.benchmarks
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._bootstrap import ensure_package

    ensure_package()

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
TEMPERATURE, LOGIT_SCALE, EPS, CLASSES = 0.07, 100.0, 0.1, 4096
# objective -> (its plain fused loss, the base loss it extends)
OBJECTIVES = {
    "info_nce+label_smoothing": "info_nce",
    "clip_loss+label_smoothing": "clip_loss",
    "info_nce+labels": "info_nce",
    "clip_loss+labels": "clip_loss",
    "info_nce+false_negative_margin": "info_nce",
    "clip_loss+false_negative_margin": "clip_loss",
    "info_nce+guide": "info_nce",
    "clip_loss+guide": "clip_loss",
    "info_nce+matryoshka": "info_nce",
    "distill_info_nce": "info_nce",
    "distill_clip": "clip_loss",
}
MARGIN = 0.1
TIME_TARGET, SPEEDUP_TARGET, MEMORY_TARGET = 1.15, 2.0, 0.03
# Others: TIME_TARGET. Matryoshka's P = 4 prefixes' log-sum-exps cost more than one pass's;
# distillation computes two score matrices.
TIME_TARGETS = {"info_nce+matryoshka": 1.3, "distill_info_nce": 2.3, "distill_clip": 2.3}
# Timed besides the three of every objective.
EXTRA_IMPLS = {"info_nce+matryoshka": ("separate",), "distill_clip": ("clip+distill apart",)}
OPEN_CLIP_DISTILL = "open_clip DistillClipLoss"  # benchmarks.peers key
OPEN_CLIP_IMPLS = ("open_clip", "objective+clip")  # timed on distill_clip when it loads
TEACHER_TEMPERATURE, TEACHER_LOGIT_SCALE = 0.05, 50.0


def matryoshka_dims(dim):
    """(32, 64, 128, 256) at D = 256, the same fractions of other D."""
    return tuple(max(1, dim * f // 8) for f in (1, 2, 4, 8))


def _materialised_distill(name, a, b, teacher):
    """Similarity distillation on the full logits (OpenCLIP's DistillClipLoss term for CLIP)."""
    import torch.nn.functional as F

    def dist_loss(teacher_logits, student_logits):
        return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1).mean(0)

    if name == "distill_info_nce":
        tq, tk = (F.normalize(t, dim=-1) for t in teacher)
        logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / TEMPERATURE
        return dist_loss(tq @ tk.T / TEACHER_TEMPERATURE, logits)
    logits, teacher_logits = LOGIT_SCALE * a @ b.T, TEACHER_LOGIT_SCALE * teacher[0] @ teacher[1].T
    return (dist_loss(teacher_logits, logits) + dist_loss(teacher_logits.T, logits.T)) / 2


def _filtered(logits, similarity, threshold):
    """The logits with every entry whose ``similarity`` beats ``threshold`` (per row), but the
    diagonal (the positive), set to -inf: Qwen3-Embedding's and GISTEmbedLoss's masks."""

    mask = similarity > threshold[:, None]
    mask.fill_diagonal_(False)
    return logits.masked_fill(mask, float("-inf"))


def _materialised(name, a, b, labels, guide=None):
    """The objective on the full logits in plain PyTorch (what a user writes today)."""
    import torch
    import torch.nn.functional as F

    if name.endswith("matryoshka"):  # one materialised loss per prefix
        targets = torch.arange(a.shape[0])
        return sum(F.cross_entropy(F.normalize(a[:, :d], dim=-1) @ F.normalize(b[:, :d], dim=-1).T
                                   / TEMPERATURE, targets) for d in matryoshka_dims(a.shape[1]))
    if name.endswith("false_negative_margin") or name.endswith("guide"):
        sim = (F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T if name.startswith("info_nce")
               else a @ b.T)
        scale = 1 / TEMPERATURE if name.startswith("info_nce") else LOGIT_SCALE
        if name.endswith("guide"):  # GISTEmbed: the guide's cosine beats its positive's
            decide = F.normalize(guide[0], dim=-1) @ F.normalize(guide[1], dim=-1).T
            threshold = decide.diagonal()
        else:  # Qwen3-Embedding: the score beats the positive's by more than the margin
            decide, threshold = sim, sim.diagonal() + MARGIN
        rows = _filtered(sim * scale, decide, threshold)
        targets = torch.arange(a.shape[0])
        loss = F.cross_entropy(rows, targets)
        if name.startswith("clip"):  # text -> image: column j's own positive, the same rule
            cols = _filtered(sim.T * scale, decide.T, threshold)
            loss = 0.5 * (loss + F.cross_entropy(cols, targets))
        return loss
    if name.startswith("info_nce"):
        logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / TEMPERATURE
    else:
        logits = LOGIT_SCALE * a @ b.T
    targets = torch.arange(a.shape[0])
    directions = [logits] if name.startswith("info_nce") else [logits, logits.T]
    losses = []
    for s in directions:
        if name.endswith("label_smoothing"):
            losses.append(F.cross_entropy(s, targets, label_smoothing=EPS))
        else:
            same = (labels[:, None] == labels[None, :]).to(s.dtype)
            mean_positive = (s * same).sum(1) / same.sum(1)
            losses.append((torch.logsumexp(s, 1) - mean_positive).mean())
    return sum(losses) / len(losses)


def make_step(name, impl, n, dim, seed=0):
    """A zero-argument forward + backward (into .grad) of objective ``name`` as ``impl``:
    "objective" (fused), "plain" (the fused base loss), "materialised", (Matryoshka)
    "separate" (one fused call per prefix) or (distill_clip) "open_clip" / "objective+clip"
    (OpenCLIP's DistillClipLoss, both terms, and its fused equivalent, distill_clip_loss) /
    "clip+distill apart" (clip_loss + distill_info_nce); top-level so that the
    memory probe pickles it by name."""
    import torch
    import torch.nn.functional as F

    import fastcontrast as fc
    from fastcontrast.cli.measure import backward_step

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=gen)
    b = a + 1.5 * torch.randn(n, dim, generator=gen)
    if name.startswith("clip") or name == "distill_clip":  # CLIP models hand over unit features
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    a, b = a.requires_grad_(True), b.requires_grad_(True)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    teacher = [F.normalize(t.detach() + 0.5 * torch.randn(n, dim, generator=gen), dim=-1)
               for t in (a, b)]
    guide = (a.detach() + torch.randn(n, dim, generator=gen), b.detach())
    base = OBJECTIVES[name]
    extra = {}
    if impl == "objective":
        if name.endswith("false_negative_margin"):
            extra = dict(false_negative_margin=MARGIN)
        elif name.endswith("guide"):
            extra = dict(guide=guide)
        elif name.endswith("matryoshka"):
            extra = dict(matryoshka_dims=matryoshka_dims(dim))
        elif name.endswith("label_smoothing"):
            extra = dict(label_smoothing=EPS)
        elif base == "info_nce":
            extra = dict(query_labels=labels, key_labels=labels)
        else:
            extra = dict(labels=labels)

    if impl == "open_clip":
        from fastcontrast.benchmarks.peers import load_peer

        cls, reason = load_peer(OPEN_CLIP_DISTILL)
        if cls is None:
            raise ImportError(reason)
        open_clip_loss = cls()
        scales = (torch.tensor(LOGIT_SCALE), torch.tensor(TEACHER_LOGIT_SCALE))

    def distill_clip():
        return fc.distill_info_nce(a, b, *teacher, temperature=1 / LOGIT_SCALE,
                                   teacher_temperature=1 / TEACHER_LOGIT_SCALE,
                                   normalize=False, backend="cpu")

    def call():
        if impl == "open_clip":  # both of its terms, summed (the module docstring)
            return sum(open_clip_loss(a, b, scales[0], *teacher, scales[1]))
        if impl == "objective+clip":
            return sum(fc.distill_clip_loss(a, b, *teacher, LOGIT_SCALE, TEACHER_LOGIT_SCALE,
                                            backend="cpu"))
        if impl == "clip+distill apart":
            return fc.clip_loss(a, b, LOGIT_SCALE, backend="cpu") + distill_clip()
        if impl == "materialised" and name.startswith("distill"):
            return _materialised_distill(name, a, b, teacher)
        if impl == "materialised":
            return _materialised(name, a, b, labels, guide)
        if impl == "separate":
            return sum(fc.info_nce(a[:, :d], b[:, :d], temperature=TEMPERATURE, backend="cpu")
                       for d in matryoshka_dims(dim))
        if impl == "objective" and name == "distill_info_nce":
            return fc.distill_info_nce(a, b, *teacher, temperature=TEMPERATURE,
                                       teacher_temperature=TEACHER_TEMPERATURE,
                                       symmetric=False, backend="cpu")
        if impl == "objective" and name == "distill_clip":
            return distill_clip()
        if base == "info_nce":
            return fc.info_nce(a, b, temperature=TEMPERATURE, backend="cpu", **extra)
        return fc.clip_loss(a, b, LOGIT_SCALE, backend="cpu", **extra)

    return backward_step(call, a, b)


def _open_clip_impls(name):
    """OPEN_CLIP_IMPLS for the symmetric distillation row when OpenCLIP loads, else () with
    the reason printed (CI may run without the bench extra)."""
    if name != "distill_clip":
        return ()
    from fastcontrast.benchmarks.peers import load_peer

    cls, reason = load_peer(OPEN_CLIP_DISTILL)
    if cls is None:
        print(f"{name}: OpenCLIP's DistillClipLoss skipped: {reason}", flush=True)
        return ()
    return OPEN_CLIP_IMPLS


def main(argv=None):
    from fastcontrast.cli.measure import (machine_info, paired_ratio, peak_extra_memory,
                                          problem_parser, save_json, summarize,
                                          time_interleaved)

    parser = problem_parser(__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--objectives", default=",".join(OBJECTIVES))
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--out", default=None, help="folder for objectives_targets.json")
    args = parser.parse_args(argv)
    for key, value in MALLOC_ENV.items():
        os.environ.setdefault(key, value)  # inherited by the memory probe's children

    result = {"n": args.n, "dim": args.dim, "dtype": "float32", "machine": machine_info(),
              "targets": {"time_vs_plain": TIME_TARGET, "speedup_vs_materialised":
                          SPEEDUP_TARGET, "memory_vs_materialised": MEMORY_TARGET},
              "objectives": {}}
    impls = ("objective", "plain", "materialised")
    for name in [o for o in args.objectives.split(",") if o]:
        steps = {impl: make_step(name, impl, args.n, args.dim)
                 for impl in impls + EXTRA_IMPLS.get(name, ()) + _open_clip_impls(name)}
        values = {impl: step() for impl, step in steps.items()}  # checked once, then timed
        if "open_clip" in values:  # a peer computing something else must not be timed
            gap = abs(values["open_clip"] - values["objective+clip"])
            if gap > 1e-4 * abs(values["open_clip"]):
                raise RuntimeError(f"OpenCLIP's DistillClipLoss gives {values['open_clip']}, "
                                   f"distill_clip_loss {values['objective+clip']}")
        samples = time_interleaved(steps, args.repeats)
        row = {"loss": values, "time": {impl: summarize(s) for impl, s in samples.items()},
               "time_vs_plain": paired_ratio(samples["objective"], samples["plain"]),
               "time_target": TIME_TARGETS.get(name, TIME_TARGET),
               "speedup_vs_materialised": paired_ratio(samples["materialised"],
                                                       samples["objective"])}
        if "open_clip" in samples:
            row["speedup_vs_open_clip"] = paired_ratio(samples["open_clip"],
                                                       samples["objective+clip"])
        if "clip+distill apart" in samples and "objective+clip" in samples:
            row["fused_vs_apart"] = paired_ratio(samples["objective+clip"],
                                                 samples["clip+distill apart"])
        if name.endswith("matryoshka"):
            row["dims"] = matryoshka_dims(args.dim)
            row["separate_vs_plain"] = paired_ratio(samples["separate"], samples["plain"])
        if args.memory:
            row["extra_bytes"] = {impl: peak_extra_memory(
                make_step, name, impl, args.n, args.dim,
                warmup_args=(name, impl, 256, args.dim)).extra_bytes
                for impl in ("objective", "materialised")}
            row["memory_vs_materialised"] = (row["extra_bytes"]["objective"]
                                             / max(1, row["extra_bytes"]["materialised"]))
        result["objectives"][name] = row
        memory = (f", memory {100 * row['memory_vs_materialised']:.2f}% of materialised"
                  if args.memory else "")
        separate = (f", separate calls {row['separate_vs_plain']:.2f}x plain fused"
                    if "separate_vs_plain" in row else "")
        open_clip = (f", distill_clip_loss {row['speedup_vs_open_clip']:.2f}x faster than "
                     f"OpenCLIP DistillClipLoss" if "speedup_vs_open_clip" in row else "")
        if "fused_vs_apart" in row:
            open_clip += f" ({row['fused_vs_apart']:.2f}x the time of clip + distill apart)"

        print(f"{name}: {row['time']['objective']['median_s']:.3f} s, "
              f"{row['time_vs_plain']:.2f}x plain fused, "
              f"{row['speedup_vs_materialised']:.2f}x faster than materialised{memory}"
              f"{separate}{open_clip}", flush=True)
    save_json(args.out, "objectives_targets.json", result)
    return result


if __name__ == "__main__":
    main()
