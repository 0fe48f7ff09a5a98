"""Shared test helpers: input factories, backend lists, and a verbose closeness check."""
import os

import torch

import fastcontrast

FUSED_BACKENDS = ("torch", "cpu", "triton")

# (rtol, atol) of a result against the float64 reference, relative to the reference's scale.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}


def device_for(backend):
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def backend_usable(backend, device="cpu"):
    return backend in fastcontrast.available_backends(device)


def interpreting_triton(backend):
    return backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"


def make_inputs(n, m, d, dtype, device="cpu", *, negatives=None, k=5, scale=1.0,
                requires_grad=True):
    """query (n, d), key (m, d) and optional negatives ('bank' (k, d) or 'per_query' (n, k, d))."""
    def rnd(*shape):
        t = (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
        return t.requires_grad_(requires_grad)

    neg = None
    if negatives == "bank":
        neg = rnd(k, d)
    elif negatives == "per_query":
        neg = rnd(n, k, d)
    return rnd(n, d), rnd(m, d), neg


def as_float64(*tensors):
    return [None if t is None else t.detach().to(torch.float64).requires_grad_(t.requires_grad)
            for t in tensors]


def assert_close(actual, expected, dtype, name, *, scale=None, max_logit=0.0, baseline=None):
    """|actual - expected| <= (atol + 4 u |s|max) * scale + rtol * |expected| + 3 e_base
    elementwise, where ``scale`` is the magnitude of the reference (max |expected|, at least 1),
    the second term is the rounding of logits as large as ``max_logit`` in the dtype's unit
    roundoff u (in fp32, s = 450 alone carries an error of 3e-5), and e_base is the largest error
    of ``baseline`` (the plain reference run in the same low dtype) against ``expected``: a fused
    result may be a few times as far from the float64 truth as plain PyTorch in that dtype
    (e.g. gradients that cancel, 1 - p_positive ~ 1e-3). Prints where it fails."""
    rtol, atol = TOLERANCES[dtype]
    atol = atol + 4 * torch.finfo(dtype).eps / 2 * max_logit
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values {actual}"
    if scale is None:
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    err = (actual - expected).abs()
    bound = atol * scale + rtol * expected.abs()
    if baseline is not None:
        baseline = baseline.detach().to(torch.float64).cpu()
        bound = bound + 3 * float((baseline - expected).abs().max())
    bad = err > bound
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} elements differ; max err "
            f"{float(err.max()):.3e} (scale {scale:.3e}); first at {idx}: "
            f"actual {float(actual[tuple(idx)]):.8e} expected {float(expected[tuple(idx)]):.8e}")
