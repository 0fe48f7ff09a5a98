"""The checks of the false-negative filter's arguments (false_negative_margin, guide,
guide_margin, guide_margin_strategy, return_dropped) of info_nce, clip_loss and moco_loss, and the
FalseNegatives filter they make (fastcontrast/infonce/false_negatives.py)."""
import numbers

from . import _validation as check
from .infonce.false_negatives import GUIDE_STRATEGIES, FalseNegatives

__all__ = ["false_negative_args", "info_nce_filter", "clip_filter", "moco_filter"]


def _margin(value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"false_negative_margin must be a float or None, got "
                        f"{type(value).__name__}")
    if not check._finite(value) or value < 0:
        raise ValueError(f"false_negative_margin must be a finite number >= 0, got {value}")
    return float(value)


def _guide(guide, names, rows):
    """The guide tensors: a tuple of len(names) floating 2-D tensors of rows[k] rows each, one
    guide dimension G, on the device of the features."""
    if not isinstance(guide, (tuple, list)) or len(guide) != len(names):
        raise TypeError(f"guide must be a tuple ({', '.join(names)}), got "
                        f"{type(guide).__name__}"
                        + (f" of length {len(guide)}" if isinstance(guide, (tuple, list)) else ""))
    width = None
    for name, t, (rows_name, n, device) in zip(names, guide, rows):
        check.check_tensor(name, t, (2,))
        if t.device != device:
            raise ValueError(f"{name} must be on the device of the features ({device}), "
                             f"got {t.device}")
        if t.shape[0] != n:
            raise ValueError(f"{name} must have {n} rows (as {rows_name}), got shape "
                             f"{tuple(t.shape)}")
        if width is not None and t.shape[1] != width:
            raise ValueError(f"{name} must have the guide dimension G = {width} (from {names[0]}),"
                             f" got shape {tuple(t.shape)}")
        width = t.shape[1]
    return tuple(t.detach() for t in guide)


def false_negative_args(false_negative_margin, guide, guide_margin, guide_margin_strategy,
                        return_dropped, *, guide_names, guide_rows, conflicts=()):
    """The FalseNegatives filter of a call, or None without one. ``guide_names`` / ``guide_rows``:
    the names of the guide's tensors and (name, rows, device) of the features they shadow;
    ``conflicts``: (name, active) options that cannot be combined with a filter."""
    check.check_flag("return_dropped", return_dropped)
    margin = _margin(false_negative_margin)
    check.check_choice("guide_margin_strategy", guide_margin_strategy, GUIDE_STRATEGIES)
    if isinstance(guide_margin, bool) or not isinstance(guide_margin, numbers.Real) or \
            not check._finite(guide_margin):
        raise ValueError(f"guide_margin must be a finite number, got {guide_margin!r}")
    if guide is None:
        if guide_margin != 0 or guide_margin_strategy != "absolute":
            raise ValueError("guide_margin / guide_margin_strategy apply to the guide rule: pass "
                             "guide=(...) with them")
        if margin is None:
            if return_dropped:
                raise ValueError("return_dropped counts the candidates that the false-negative "
                                 "filter drops: pass false_negative_margin or guide with it")
            return None
    tensors = (None, None, None) if guide is None else _guide(guide, guide_names, guide_rows)
    for name, active in conflicts:
        if active:
            raise ValueError(f"false_negative_margin / guide cannot be combined with {name}")
    guide_query, guide_key, *rest = tensors
    return FalseNegatives(margin=margin, guide_query=guide_query, guide_key=guide_key,
                          guide_bank=rest[0] if rest else None, guide_margin=float(guide_margin),
                          guide_strategy=guide_margin_strategy)


def info_nce_filter(query, key, negatives, *, exclude_self, symmetric, objectives,
                    label_smoothing, labels, matryoshka, false_negative_margin, guide,
                    guide_margin, guide_margin_strategy, return_dropped):
    """The FalseNegatives filter of an info_nce call, or None: guide = (guide_query (N, G),
    guide_key (M, G)[, guide_negatives (K, G) with a bank]; distributed: this rank's rows).
    ``objectives``: DCL / DCLW / HCL options given."""
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
    """The FalseNegatives filter of a clip_loss call, or None: guide = (guide_image (N, G),
    guide_text (N, G))."""
    rows = [("image", image.shape[0], image.device), ("text", text.shape[0], image.device)]
    return false_negative_args(
        false_negative_margin, guide, guide_margin, guide_margin_strategy, return_dropped,
        guide_names=("guide_image", "guide_text"), guide_rows=rows,
        conflicts=(("label_smoothing", label_smoothing != 0), ("labels", labels),
                   ("matryoshka_dims", matryoshka)))


def moco_filter(query, key, queue, *, objectives, label_smoothing, false_negative_margin, guide,
                guide_margin, guide_margin_strategy, return_dropped):
    """The FalseNegatives filter of a moco_loss call, or None: guide = (guide_query (N, G),
    guide_key (N, G), guide_queue (K, G); distributed: the queue's as every rank holds it).
    ``objectives``: DCL / HCL options given."""
    rows = [("query", query.shape[0], query.device), ("key", key.shape[0], query.device),
            ("queue", queue.shape[0], query.device)]
    return false_negative_args(
        false_negative_margin, guide, guide_margin, guide_margin_strategy, return_dropped,
        guide_names=("guide_query", "guide_key", "guide_queue"), guide_rows=rows,
        conflicts=(("decoupled / hcl options", objectives),
                   ("label_smoothing", label_smoothing != 0)))
