"""The fused objectives' distributed forms on the compiled CPU kernels in float32 and bfloat16
(the other distributed cases run the "torch" backend in float64): each objective case of
_workers.py with the distributed call on backend "cpu", its inputs cast, against the float64
single-process reference on the whole batch of the same (rounded) inputs. Results under
"{tag}{backend}-{dtype}/"."""
import torch

from ._distill_cases import NAMES as DISTILL
from ._false_negative_cases import NAMES as FALSE_NEGATIVES
from ._label_smoothing_cases import NAMES as LABEL_SMOOTHING
from ._matryoshka_cases import NAMES as MATRYOSHKA
from ._multi_positive_cases import NAMES as MULTI_POSITIVE

OBJECTIVES = [*LABEL_SMOOTHING, *MULTI_POSITIVE, *MATRYOSHKA, *FALSE_NEGATIVES, *DISTILL]
# Relative error bounds of the losses and gradients against float64 on the same rounded
# inputs: the kernels accumulate in float32; bfloat16 losses and gradients are rounded on the
# way out (ulp 2^-7 relative), so two modes may differ by a little over one ulp.
DTYPES = {"float32": (torch.float32, 1e-4), "bfloat16": (torch.bfloat16, 2e-2)}
BACKEND = "cpu"


def prefix(tag, dtype_name):
    return f"{tag}{BACKEND}-{dtype_name}/"


def run_backend_cases(group, out, tag, seed=4000):
    """Every objective case in both modes on BACKEND in each of DTYPES (see the module)."""
    from fastcontrast import backends

    from ._workers import _case_list, run_case

    if BACKEND not in backends.available_backends("cpu"):
        out[f"{tag}{BACKEND}-skipped"] = f"backend {BACKEND!r} unavailable"
        return
    cases = [c for c in _case_list(backend=BACKEND)[0] if c.name in OBJECTIVES]
    for name, (dtype, _) in DTYPES.items():
        for i, case in enumerate(cases):
            run_case(case, group, seed=seed + i, out=out, tag=prefix(tag, name), dtype=dtype)
