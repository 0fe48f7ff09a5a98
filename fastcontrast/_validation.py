"""Argument checks shared by the public functions: every bad input raises a TypeError or
ValueError that names the argument, the expected value and the actual one."""
import math
import numbers

import torch

from ._host import accumulate_dtype


def reads_values(t):
    """Whether a check may read the values of tensor ``t``: not under torch.compile (a read is a
    device sync and a graph break) and not for meta tensors (they have none)."""
    return not torch.compiler.is_compiling() and t.device.type != "meta"


def _describe(t):
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name, t, ndims, *, optional=False):
    """A floating-point tensor with one of ``ndims`` dimensions and no zero-sized dimension."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
    if t.dim() not in ndims:
        expected = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {expected}, got {t.dim()}-D ({_describe(t)})")
    if t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got {_describe(t)}")


def check_same(name, t, ref_name, ref):
    """Same dtype and device as the reference tensor."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), "
                         f"got {t.device}")


def check_feature_dim(name, t, dim):
    if t.shape[-1] != dim:
        raise ValueError(f"{name} must have feature dimension D = {dim} (from query), "
                         f"got shape {tuple(t.shape)}")


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _finite(number):
    """math.isfinite by comparisons (False for NaN and +-inf), traceable on symbolic floats."""
    return -math.inf < number < math.inf


def finite_scalar(name, value, device, *, positive=False, dtype=None):
    """A finite (``positive``: and > 0) float or 0-dim floating tensor, returned as a 0-dim tensor
    on device (a tensor keeps its autograd history; a float becomes float64).

    ``dtype``: the inputs' dtype. Then the scalar is returned in the precision the loss
    accumulates in (float64 for float64 inputs, else float32, whatever the scalar's own dtype:
    a float16 temperature is inverted in float32), and it (and with ``positive`` its
    reciprocal) must be finite there."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name} must be a float or a 0-dim tensor, got shape "
                             f"{tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} tensor must have a floating-point dtype, got {value.dtype}")
        number = float(value.detach()) if reads_values(value) else 1.0  # unchecked when tracing
        tensor = value.to(device)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        tensor = None
    else:
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    # Comparisons rather than math.isfinite: under torch.compile with dynamic=True a float
    # argument is symbolic, and a comparison becomes a guard where math.isfinite fails to trace.
    if not _finite(number) or (positive and number <= 0):
        raise ValueError(f"{name} must be {'positive and ' if positive else ''}finite, "
                         f"got {number}")
    if tensor is None:
        tensor = torch.tensor(number, dtype=torch.float64, device=device)
    if dtype is not None:
        acc = accumulate_dtype(dtype)
        _check_in_range(name, number, acc, positive)
        tensor = tensor.to(acc)
    return tensor


def _check_in_range(name, number, acc, positive):
    """number (and 1 / number for positive scalars, which are inverted) finite in ``acc``."""
    limit = torch.finfo(acc).max
    if abs(number) > limit or (positive and 1.0 / number > limit):
        what = f"{name} = {number!r}" + (f" (1 / {name} = {1.0 / number!r})" if positive else "")
        raise ValueError(f"{what} overflows {acc}, the precision this loss computes in for "
                         f"these inputs; use a value within +-{limit:.3g} (or float64 inputs)")


def positive_scalar(name, value, device, *, dtype=None):
    """finite_scalar(..., positive=True): temperatures, logit scales."""
    return finite_scalar(name, value, device, positive=True, dtype=dtype)


def check_image_text(image, text, names=("image", "text")):
    """(N, D) floating image and text of one shape, dtype and device (text i matches image i);
    ``names``: the caller's names of the two."""
    image_name, text_name = names
    check_tensor(image_name, image, (2,))
    check_tensor(text_name, text, (2,))
    check_same(text_name, text, image_name, image)
    if text.shape != image.shape:
        raise ValueError(f"{text_name} must have the shape of {image_name} {tuple(image.shape)} "
                         f"({text_name} i is the positive of {image_name} i), got "
                         f"{tuple(text.shape)}")


def check_targets(targets, n, m, device):
    """None, or an int64 tensor of shape (n,) on ``device`` whose values index the ``m`` keys
    (check_target_range). ``m`` None: the values are checked by the caller (the distributed
    losses, where targets index the keys of every rank, known after the metadata exchange)."""
    if targets is None:
        return
    if not isinstance(targets, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor of int64, got {type(targets).__name__}")
    if targets.dtype != torch.int64:
        raise TypeError(f"targets must have dtype torch.int64, got {targets.dtype}")
    if tuple(targets.shape) != (n,):
        raise ValueError(f"targets must have shape ({n},) (one per query), "
                         f"got {tuple(targets.shape)}")
    if targets.device != device:
        raise ValueError(f"targets must be on the device of query ({device}), got {targets.device}")
    if m is not None:
        check_target_range(targets, m)


def check_target_range(targets, m, *, keys="keys", count="M"):
    """Values of ``targets`` in [0, m): ``keys`` names what they index and ``count`` its size
    in the message (the distributed losses: "the keys of all ranks", "M_total"). Skipped where
    values may not be read (reads_values)."""
    if not reads_values(targets):
        return
    low, high = int(targets.min()), int(targets.max())
    if low < 0 or high >= m:
        raise ValueError(f"targets must index {keys} in [0, {m - 1}] ({count} = {m}), "
                         f"got values in [{low}, {high}]")


def check_targets_not_self(targets, rows=None, *, row="i"):
    """exclude_self: targets[i] != rows[i], the index of row i among the keys (default i;
    ``row`` names it in the message), else the positive would be excluded. Skipped where values
    may not be read (reads_values)."""
    if not reads_values(targets):
        return
    if rows is None:
        rows = torch.arange(targets.shape[0], device=targets.device)
    if bool((targets == rows).any()):
        raise ValueError(f"exclude_self=True: targets[i] must differ from {row} (the positive "
                         f"would be excluded)")


def check_positive_number(name, value):
    """A python int or float (not a bool) > 0: a peer's constructor argument (a temperature)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def non_negative_float(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not _finite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def check_ids(name, ids, n, device):
    """An int64 tensor of shape (n,) on device (labels, sample indices)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64, got {type(ids).__name__}")
    if ids.dtype != torch.int64:
        raise TypeError(f"{name} must have dtype torch.int64, got {ids.dtype}")
    if tuple(ids.shape) != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} must be on {device} (the device of the features), "
                         f"got {ids.device}")


def check_int(name, value, minimum=1):
    """An int (not a bool) >= minimum, returned as int."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_view_pair(z1, z2):
    """NT-Xent's two views: (N, D) floating tensors of one shape, dtype and device."""
    if isinstance(z2, torch.Tensor) and not z2.is_floating_point() and not z2.is_complex():
        # pytorch-metric-learning's NTXentLoss is called as (embeddings, labels).
        raise TypeError(f"z2 must have a floating-point dtype, got {z2.dtype}: the second "
                        f"argument of nt_xent / NTXentLoss is the second view (N, D) of the "
                        f"batch, not labels; for (embeddings, labels) use fastcontrast.supcon "
                        f"/ SupConLoss")
    check_tensor("z1", z1, (2,))
    check_tensor("z2", z2, (2,))
    check_same("z2", z2, "z1", z1)
    if z2.shape != z1.shape:
        raise ValueError(f"z2 must have the shape of z1 {tuple(z1.shape)}, got {tuple(z2.shape)}")
