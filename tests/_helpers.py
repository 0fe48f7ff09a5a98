"""Shared test helpers: input factories, backend lists, the float64 oracle of the masked-LSE
kernel contract, and the one closeness check of the suite (``assert_close``)."""
import os
from typing import NamedTuple, Optional

import torch

import fastcontrast

FUSED_BACKENDS = ("torch", "cpu", "triton")

# (rtol, atol) of a loss or input gradient against the float64 reference, relative to the
# reference's scale: the low-precision inputs are also normalised and reduced in their dtype.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (6e-2, 6e-2),
}
# (rtol, atol) of a kernel's outputs against the float64 contract on the very inputs it got:
# float32 accumulation whatever the input dtype; half-precision gradients round the dS tile to
# the input dtype before the second product.
KERNEL_TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
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


# ---------------------------------------------------------------------------------------------
# The masked-LSE contract (fastcontrast/infonce/ops.py): the one oracle of the kernels.


class Contract(NamedTuple):
    row_lse: torch.Tensor
    col_lse: torch.Tensor
    dq: Optional[torch.Tensor]
    dkeys: Optional[torch.Tensor]


def masked_scores(q, keys, alpha, beta, *, exclude_diag=False, diag_offset=0, row_ids=None,
                  col_ids=None, dtype=torch.float64):
    """s_ij = alpha_i beta_j <q_i, keys_j> in ``dtype`` on the CPU; -inf where j == i +
    diag_offset (exclude_diag) or row_ids_i == col_ids_j >= 0."""
    q, keys, alpha, beta = (t.detach().cpu().to(dtype) for t in (q, keys, alpha, beta))
    s = alpha[:, None] * beta[None, :] * (q @ keys.T)
    n, m = s.shape
    masked = torch.zeros(n, m, dtype=torch.bool)
    if exclude_diag:
        masked |= torch.arange(m)[None, :] == torch.arange(n)[:, None] + diag_offset
    if row_ids is not None:
        r, c = row_ids.cpu()[:, None], col_ids.cpu()[None, :]
        masked |= (r == c) & (r >= 0)
    return s.masked_fill(masked, float("-inf"))


def _probabilities(s, lse, dim):
    """exp(s - lse) along ``dim``; 0 where lse = -inf (an lse of -inf contributes nothing)."""
    lse = lse.unsqueeze(dim)
    return torch.where(torch.isneginf(lse), torch.zeros_like(s), torch.exp(s - lse))


def masked_lse_oracle(q, keys, alpha, beta, *, row_lse=None, row_grad=None, col_lse=None,
                      col_grad=None, extra_lse=None, dtype=torch.float64, **mask):
    """The contract in ``dtype`` (float64: the truth), on the CPU: row / column log-sum-exp of the
    masked scores (-inf without any entry; the row lse merged with ``extra_lse`` when given, as
    masked_lse_forward_with_grad), and with ``row_grad`` the gradients
        dS_ij = g_i exp(s_ij - row_lse_i) [+ c_j exp(s_ij - col_lse_j) with col_grad],
        dq_i = alpha_i sum_j dS_ij beta_j keys_j,  dkeys_j = beta_j sum_i dS_ij alpha_i q_i,
    for the lse given (a global lse, as the host passes it to the backward) or else the own."""
    s = masked_scores(q, keys, alpha, beta, dtype=dtype, **mask)
    own_row, own_col = torch.logsumexp(s, 1), torch.logsumexp(s, 0)
    if extra_lse is not None:
        own_row = torch.logaddexp(own_row, extra_lse.detach().cpu().to(dtype))

    def given(t, own):
        return own if t is None else t.detach().cpu().to(dtype)

    row_lse, col_lse = given(row_lse, own_row), given(col_lse, own_col)
    dq = dkeys = None
    if row_grad is not None:
        ds = row_grad.detach().cpu().to(dtype)[:, None] * _probabilities(s, row_lse, 1)
        if col_grad is not None:
            ds = ds + col_grad.detach().cpu().to(dtype)[None, :] * _probabilities(s, col_lse, 0)
        q64, k64, a64, b64 = (t.detach().cpu().to(dtype) for t in (q, keys, alpha, beta))
        dq = a64[:, None] * (ds @ (b64[:, None] * k64))
        dkeys = b64[:, None] * (ds.T @ (a64[:, None] * q64))
    return Contract(row_lse, col_lse, dq, dkeys)


# ---------------------------------------------------------------------------------------------
# Closeness


def _finite_max(t):
    t = t[torch.isfinite(t)]
    return float(t.abs().max()) if t.numel() else 0.0


def assert_close(actual, expected, dtype, name, *, scale=None, floor=1.0, max_logit=0.0,
                 baseline=None, tolerances=TOLERANCES, logit_dtype=None):
    """|actual - expected| <= (atol + 4 u |s|max) * scale + rtol * |expected| + 3 e_base
    elementwise, with (rtol, atol) = tolerances[dtype]. ``scale`` is the magnitude of the
    reference (max |expected|, at least ``floor``; 1 when that is 0); the second term is the
    rounding of logits as large as ``max_logit`` in the unit roundoff u of ``logit_dtype``
    (default ``dtype``; in fp32, s = 450 alone carries an error of 3e-5); e_base is the largest
    error of ``baseline`` (the same formula run by plain PyTorch in the low dtype) against
    ``expected``: a fused result may be a few times as far from the float64 truth as that
    (e.g. gradients that cancel, 1 - p_positive ~ 1e-3). -inf in ``expected`` (a row without
    any candidate) must be -inf in ``actual``; every other element must be finite (a NaN-poisoned
    element that no kernel wrote fails here). Prints where it fails."""
    rtol, atol = tolerances[dtype]
    atol = atol + 4 * torch.finfo(logit_dtype or dtype).eps / 2 * max_logit
    assert actual is not None, f"{name}: got None"
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    no_entry = torch.isneginf(expected)
    assert torch.equal(torch.isneginf(actual), no_entry), (
        f"{name}: -inf at {torch.isneginf(actual).nonzero().tolist()[:10]}, expected at "
        f"{no_entry.nonzero().tolist()[:10]}")
    entry = ~no_entry
    assert torch.isfinite(expected[entry]).all(), f"{name}: the reference itself is not finite"
    bad = entry & ~torch.isfinite(actual)
    assert not bad.any(), (f"{name}: {int(bad.sum())} non-finite values (inf / NaN), first at "
                           f"{bad.nonzero()[0].tolist()}: {actual[bad][:5].tolist()}")
    if scale is None:
        scale = max(floor, _finite_max(expected)) or 1.0
    err = torch.where(entry, actual - expected, torch.zeros_like(actual)).abs()
    bound = atol * scale + rtol * expected.abs()
    if baseline is not None:
        baseline = baseline.detach().to(torch.float64).cpu()
        bound = bound + 3 * _finite_max((baseline - expected)[entry])
    bad = err > bound
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} elements differ; max err "
            f"{float(err.max()):.3e} (scale {scale:.3e}); first at {list(idx)}: "
            f"actual {float(actual[idx]):.8e} expected {float(expected[idx]):.8e}")


def masked_lse_truth(q, keys, alpha, beta, *, row_lse=None, row_grad=None, col_lse=None,
                     col_grad=None, extra_lse=None, dtype=torch.float64, **mask):
    """masked_lse_oracle with dS_ij = 0 at every masked entry, whatever the lse (NaN) and the
    upstream gradients (non-finite): what autograd gives through the masked_fill of the scores.
    Equal to masked_lse_oracle on finite inputs; the truth for NaN and +-inf inputs, where the
    log-sum-exps and the products follow IEEE arithmetic as float64 PyTorch does."""
    own = masked_lse_oracle(q, keys, alpha, beta, row_lse=row_lse, col_lse=col_lse,
                            extra_lse=extra_lse, dtype=dtype, **mask)
    if row_grad is None:
        return own
    s = masked_scores(q, keys, alpha, beta, dtype=dtype, **mask)
    n, m = s.shape
    # The mask alone: scores of zero vectors are 0 where unmasked, -inf where masked.
    masked = torch.isneginf(masked_scores(torch.zeros(n, 1), torch.zeros(m, 1), torch.ones(n),
                                          torch.ones(m), dtype=dtype, **mask))
    ds = row_grad.detach().cpu().to(dtype)[:, None] * _probabilities(s, own.row_lse, 1)
    if col_grad is not None:
        ds = ds + col_grad.detach().cpu().to(dtype)[None, :] * _probabilities(s, own.col_lse, 0)
    ds = ds.masked_fill(masked, 0.0)
    q64, k64, a64, b64 = (t.detach().cpu().to(dtype) for t in (q, keys, alpha, beta))
    dq = a64[:, None] * (ds @ (b64[:, None] * k64))
    dkeys = b64[:, None] * (ds.T @ (a64[:, None] * q64))
    return Contract(own.row_lse, own.col_lse, dq, dkeys)


def assert_compiles_with_changing_batch_sizes(step, tensors):
    """torch.compile(step, fullgraph=True, dynamic=True) gives step's value at N = 3, 8, 13 with
    no graph break: ``step`` takes ``tensors`` random (N, 5) float32 inputs."""
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for n in (3, 8, 13):
        inputs = torch.randn(tensors, n, 5)
        assert_close(compiled(*inputs), step(*inputs), torch.float32, f"n={n}")
