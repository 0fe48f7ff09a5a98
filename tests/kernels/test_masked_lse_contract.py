"""The masked-LSE kernel contract (fastcontrast/infonce/ops.py) on every kernel backend
that runs here, through the registered ops torch.ops.fastcontrast.masked_lse_forward /
masked_lse_backward / masked_lse_forward_with_grad (the last where the backend fuses the
gradient), against the float64 oracle of tests/_helpers.py on the very inputs the kernel got.

Covered: odd shapes (N = 1, 37, 257; M = 1, 130; D = 3, 67, 1000), every input dtype each
backend takes, the diagonal mask with offsets, id masks (rows and columns without any entry:
lse -inf and exactly zero gradient), column lse and column gradient, a global lse larger than
the kernel's own, tiny temperatures on large-norm inputs, the need_dq / need_dkeys flags (absent
outputs are 0-element tensors), empty inputs, and the fake kernels. Every output is
NaN-poisoned first (FASTCONTRAST_POISON_OUTPUTS=1), so an element no kernel writes fails."""
import pytest
import torch
import torch.nn.functional as F

from fastcontrast import backends

from .._helpers import (KERNEL_TOLERANCES, assert_close, device_for,
                       interpreting_triton, masked_lse_oracle, masked_scores)

OPS = torch.ops.fastcontrast
SHAPES = [(1, 1, 3), (1, 130, 67), (37, 1, 1000), (37, 130, 3), (37, 130, 1000),
          (257, 1, 67), (257, 130, 3), (257, 130, 1000)]
MASKS = ["none", "diag", "diag+3", "diag-2", "ids", "ids+diag", "empty_rows"]
# Every mask on shapes with each N and M, the main four on the others.
FULL_MASK_SHAPES = [(1, 1, 3), (37, 130, 3), (257, 1, 67)]
CORE_MASKS = ["none", "diag-2", "ids+diag", "empty_rows"]
DTYPE_CASES = [(name, dtype) for name, props in backends.PROPERTIES.items()
               for dtype in props.compute_dtypes]
# The Triton interpreter is slow: shapes up to N * M * D = 4e4 (D = 1000 in chunks and N = 257
# over several row programs included), half precision with the main masks only, bfloat16
# (emulated) up to 1e4.
INTERPRETER_ELEMENTS = {torch.float32: 4 * 10 ** 4, torch.float16: 4 * 10 ** 4,
                        torch.bfloat16: 10 ** 4}


def _runs(backend, dtype, shape, mask):
    """Whether the contract grid has this case."""
    core = mask in CORE_MASKS
    if not (core or shape in FULL_MASK_SHAPES):
        return False
    if interpreting_triton(backend):
        small = shape[0] * shape[1] * shape[2] <= INTERPRETER_ELEMENTS[dtype]
        return small and (core or dtype == torch.float32)
    return True


CASES = [pytest.param(backend, dtype, shape, mask, id=f"{backend}-{str(dtype)[6:]}-"
                      + "x".join(map(str, shape)) + f"-{mask}")
         for backend, dtype in DTYPE_CASES for shape in SHAPES for mask in MASKS
         if _runs(backend, dtype, shape, mask)]
FUSED_CASES = [c for c in CASES if backends.PROPERTIES[c.values[0]].fuses_gradient]

# log2(0) of a row without entries is a legitimate -inf; numpy (the Triton interpreter) warns.
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")


def _case_id(case):
    return f"{case[0]}-{str(case[1]).split('.')[1]}"


@pytest.fixture(autouse=True)
def _poisoned_outputs(configure):
    configure(poison_outputs=True)
    # Chunks of a few rows: the torch backend's merge over chunks runs on these small inputs.
    configure(torch_chunk_elements=4096)


def _skip_unavailable(backend):
    if backend not in backends.available_backends(device_for(backend)):
        pytest.skip(f"backend {backend!r} cannot run here")


def _vector_dtype(backend, dtype):
    """The dtype of alpha, beta, the lse and the upstream gradients: the kernels' output dtype."""
    return backends.PROPERTIES[backend].output_dtype(dtype)


def _mask(kind, n, m, device):
    """(exclude_diag, diag_offset, row_ids, col_ids) of a named mask."""
    exclude_diag = kind.startswith("diag") or kind == "ids+diag"
    offset = int(kind[4:]) if kind.startswith("diag") and len(kind) > 4 else 0
    row_ids = col_ids = None
    if kind in ("ids", "ids+diag"):  # ids in [-1, hi): keys share ids, -1 matches nothing
        hi = 3 if kind == "ids" else 50
        row_ids, col_ids = torch.randint(-1, hi, (n,)), torch.randint(-1, hi, (m,))
    elif kind == "empty_rows":  # every key has id 7: the even rows (id 7) have no entry at all
        row_ids = torch.where(torch.arange(n) % 2 == 0, 7, -1)
        col_ids = torch.full((m,), 7)
    if row_ids is not None:
        row_ids, col_ids = row_ids.to(device), col_ids.to(device)
    return dict(exclude_diag=exclude_diag, diag_offset=offset, row_ids=row_ids, col_ids=col_ids)


def _problem(backend, n, m, d, dtype, *, inv_tau=1 / 0.07, scale=1.0, prenormalized=None):
    """(q, keys, alpha, beta) as the host passes them: raw rows with the inverse norms folded
    into alpha = inv_tau / |q_i|, beta = 1 / |k_j|, or for a backend that prefers them unit rows
    with non-uniform alpha ~ inv_tau, beta ~ 1."""
    if prenormalized is None:
        prenormalized = backends.PROPERTIES[backend].prenormalized
    f64 = torch.float64
    q, keys = torch.randn(n, d, dtype=f64) * scale, torch.randn(m, d, dtype=f64) * scale
    if prenormalized:
        q, keys = F.normalize(q, dim=1), F.normalize(keys, dim=1)
        alpha = inv_tau * (0.8 + 0.4 * torch.rand(n, dtype=f64))
        beta = 0.8 + 0.4 * torch.rand(m, dtype=f64)
    else:
        alpha, beta = inv_tau / q.norm(dim=1), 1.0 / keys.norm(dim=1)
    device, vec = device_for(backend), _vector_dtype(backend, dtype)
    return (q.to(device=device, dtype=dtype), keys.to(device=device, dtype=dtype),
            alpha.to(device=device, dtype=vec), beta.to(device=device, dtype=vec))


def _baseline(dtype, *args, **kwargs):
    """The oracle run by PyTorch in float32 on float32 inputs (the error baseline), else None."""
    if dtype != torch.float32:
        return None
    return masked_lse_oracle(*args, dtype=torch.float32, **kwargs)


def _check(actual, truth, base, dtype, name, *, gradient=False, max_logit=0.0):
    """The one closeness rule of this file: lse relative to max(1, max |lse|), gradients to
    their own magnitude; float32 within 3x PyTorch's own float32 error as well."""
    assert_close(actual, truth, dtype, name, floor=0.0 if gradient else 1.0, baseline=base,
                 tolerances=KERNEL_TOLERANCES, logit_dtype=torch.float32 if dtype in (
                     torch.float16, torch.bfloat16) else dtype, max_logit=max_logit)


def _global_lse(own, vec):
    """A global lse as the host passes it: the kernel's own merged with extra candidates of
    comparable mass; every third entry keeps the own one (-inf where there is no entry)."""
    finite = torch.where(torch.isneginf(own), torch.full_like(own, 2.0), own)
    extra = finite + 0.5 * torch.randn_like(own)
    extra[::3] = float("-inf")
    return torch.logaddexp(own, extra).to(vec)


def _assert_zero_where_empty(grad, empty, name):
    """Exactly 0 (not tiny, never NaN) on the rows of ``grad`` without any entry."""
    rows = grad.detach().cpu()[empty.cpu()]
    assert torch.equal(rows, torch.zeros_like(rows)), f"{name}: rows without entries not 0"


# ---------------------------------------------------------------------------------------------
# masked_lse_forward, then masked_lse_backward with a global lse


@pytest.mark.parametrize("terms", ["rows", "rows+cols"])
@pytest.mark.parametrize("backend,dtype,shape,mask", CASES)
def test_forward_and_backward(backend, dtype, shape, mask, terms):
    _skip_unavailable(backend)
    n, m, _ = shape
    with_col = terms == "rows+cols"
    q, keys, alpha, beta = _problem(backend, *shape, dtype)
    masks = _mask(mask, n, m, q.device)
    vec = _vector_dtype(backend, dtype)
    row, col = OPS.masked_lse_forward(q, keys, alpha, beta, masks["row_ids"], masks["col_ids"],
                                      masks["exclude_diag"], masks["diag_offset"], with_col,
                                      backend)
    assert row.dtype == col.dtype == vec and row.device == q.device
    own = masked_lse_oracle(q, keys, alpha, beta, **masks)
    base = _baseline(dtype, q, keys, alpha, beta, **masks)
    _check(row, own.row_lse, base and base.row_lse, dtype, "row_lse")
    if with_col:
        _check(col, own.col_lse, base and base.col_lse, dtype, "col_lse")
    else:
        assert col.shape == (0,), f"col_lse: {tuple(col.shape)}, expected a 0-element tensor"

    row_lse = _global_lse(own.row_lse, vec).to(q.device)
    row_grad = torch.randn(n, dtype=vec, device=q.device)  # both signs, non-uniform
    col_lse = col_grad = None
    if with_col:
        col_lse = _global_lse(own.col_lse, vec).to(q.device)
        col_grad = 0.5 * torch.randn(m, dtype=vec, device=q.device)
    dq, dkeys = OPS.masked_lse_backward(q, keys, alpha, beta, row_lse, row_grad, col_lse,
                                        col_grad, masks["row_ids"], masks["col_ids"],
                                        masks["exclude_diag"], masks["diag_offset"], True, True,
                                        backend)
    assert dq.dtype == dkeys.dtype == vec
    grads = dict(row_lse=row_lse, row_grad=row_grad, col_lse=col_lse, col_grad=col_grad, **masks)
    truth = masked_lse_oracle(q, keys, alpha, beta, **grads)
    base = _baseline(dtype, q, keys, alpha, beta, **grads)
    _check(dq, truth.dq, base and base.dq, dtype, "dq", gradient=True)
    _check(dkeys, truth.dkeys, base and base.dkeys, dtype, "dkeys", gradient=True)
    _assert_zero_where_empty(dq, torch.isneginf(own.row_lse), "dq")
    _assert_zero_where_empty(dkeys, torch.isneginf(own.col_lse), "dkeys")


# ---------------------------------------------------------------------------------------------
# masked_lse_forward_with_grad (backends that fuse the gradient)


@pytest.mark.parametrize("backend,dtype,shape,mask", FUSED_CASES)
def test_forward_with_grad(backend, dtype, shape, mask):
    _skip_unavailable(backend)
    n, m, _ = shape
    q, keys, alpha, beta = _problem(backend, *shape, dtype)
    masks = _mask(mask, n, m, q.device)
    vec = _vector_dtype(backend, dtype)
    row_grad = torch.randn(n, dtype=vec, device=q.device)
    # The lse of other candidates of the row (the positive, per-query negatives); -inf (every
    # third row): none, the row lse is the kernel's own.
    extra_lse = 3 * torch.randn(n, dtype=vec, device=q.device)
    extra_lse[::3] = float("-inf")
    lse, dq, dkeys = OPS.masked_lse_forward_with_grad(
        q, keys, alpha, beta, row_grad, masks["row_ids"], masks["col_ids"], extra_lse,
        masks["exclude_diag"], masks["diag_offset"], True, True, backend)
    assert lse.dtype == dq.dtype == dkeys.dtype == _vector_dtype(backend, dtype)
    args = dict(row_grad=row_grad, extra_lse=extra_lse, **masks)
    truth = masked_lse_oracle(q, keys, alpha, beta, **args)
    base = _baseline(dtype, q, keys, alpha, beta, **args)
    _check(lse, truth.row_lse, base and base.row_lse, dtype, "row_lse")
    _check(dq, truth.dq, base and base.dq, dtype, "dq", gradient=True)
    _check(dkeys, truth.dkeys, base and base.dkeys, dtype, "dkeys", gradient=True)
    own = masked_lse_oracle(q, keys, alpha, beta, **masks)
    _assert_zero_where_empty(dq, torch.isneginf(own.row_lse), "dq")
    _assert_zero_where_empty(dkeys, torch.isneginf(own.col_lse), "dkeys")


# ---------------------------------------------------------------------------------------------
# need_dq / need_dkeys, tiny temperatures on large norms, empty inputs, layouts, fake kernels


@pytest.mark.parametrize("need", [(True, False), (False, True), (False, False)],
                         ids=["dq", "dkeys", "neither"])
@pytest.mark.parametrize("backend", list(backends.PROPERTIES))
def test_need_flags(backend, need):
    """An output not needed is a 0-element tensor; the other one is unchanged."""
    _skip_unavailable(backend)
    dtype = torch.float32
    q, keys, alpha, beta = _problem(backend, 37, 130, 67, dtype)
    vec = _vector_dtype(backend, dtype)
    row_grad = torch.randn(37, dtype=vec, device=q.device)
    col_grad = torch.randn(130, dtype=vec, device=q.device)
    own = masked_lse_oracle(q, keys, alpha, beta, exclude_diag=True, diag_offset=2)
    lse = [t.to(device=q.device, dtype=vec) for t in (own.row_lse, own.col_lse)]
    outputs = OPS.masked_lse_backward(q, keys, alpha, beta, lse[0], row_grad, lse[1], col_grad,
                                      None, None, True, 2, *need, backend)
    truth = masked_lse_oracle(q, keys, alpha, beta, row_lse=lse[0], row_grad=row_grad,
                              col_lse=lse[1], col_grad=col_grad, exclude_diag=True,
                              diag_offset=2)
    expected = [truth.dq, truth.dkeys]
    if backends.PROPERTIES[backend].fuses_gradient:
        lse_f, *fused = OPS.masked_lse_forward_with_grad(q, keys, alpha, beta, row_grad, None,
                                                         None, None, True, 2, *need, backend)
        _check(lse_f, own.row_lse, None, dtype, "fused row_lse")
        rows_only = masked_lse_oracle(q, keys, alpha, beta, row_grad=row_grad, exclude_diag=True,
                                      diag_offset=2)
        outputs = list(outputs) + fused
        expected += [rows_only.dq, rows_only.dkeys]
    for k, (got, ref) in enumerate(zip(outputs, expected)):
        name = ("dq", "dkeys")[k % 2] + (" fused" if k >= 2 else "")
        if need[k % 2]:
            _check(got, ref, None, dtype, name, gradient=True)
        else:
            assert got.shape == (0,), f"{name}: {tuple(got.shape)}, expected a 0-element tensor"


@pytest.mark.parametrize("kind,inv_tau", [("cosine", 100.0), ("cosine", 1e4), ("raw", 100.0)])
@pytest.mark.parametrize("case", [c for c in DTYPE_CASES if c[1] in (torch.float32,
                                                                     torch.float64)],
                         ids=_case_id)
def test_large_scores(case, kind, inv_tau):
    """|s| up to ~1e4: tiny temperatures on large-norm inputs (cosine: alpha = 1 / (tau |q_i|),
    beta = 1 / |k_j|; raw: the unnormalised loss, alpha = 1 / tau, beta = 1). Finite, and within
    the rounding that scores that large carry (the max_logit term, and PyTorch's own error)."""
    backend, dtype = case
    _skip_unavailable(backend)
    n, m, d = 40, 48, 32
    q, keys, alpha, beta = _problem(backend, n, m, d, dtype, inv_tau=inv_tau, scale=50.0,
                                    prenormalized=False)
    if kind == "raw":  # |q_i| |k_j| ~ 32 at scale 1: |s| up to ~1e3 .. 1e4
        q, keys = q / 50, keys / 50
        alpha, beta = torch.full_like(alpha, inv_tau), torch.ones_like(beta)
    vec = _vector_dtype(backend, dtype)
    row_grad = torch.randn(n, dtype=vec, device=q.device)
    col_grad = torch.randn(m, dtype=vec, device=q.device)
    masks = dict(row_ids=None, col_ids=None, exclude_diag=True, diag_offset=0)
    own, own_base = (masked_lse_oracle(q, keys, alpha, beta, **masks),
                     _baseline(dtype, q, keys, alpha, beta, **masks))
    max_logit = float(own.row_lse.abs().max())
    assert max_logit > 50, "the case is what it claims to be"
    row, col = OPS.masked_lse_forward(q, keys, alpha, beta, None, None, True, 0, True, backend)
    dq, dkeys = OPS.masked_lse_backward(q, keys, alpha, beta, row, row_grad, col, col_grad,
                                        None, None, True, 0, True, True, backend)
    args = dict(row_lse=row, row_grad=row_grad, col_lse=col, col_grad=col_grad, **masks)
    truth, base = (masked_lse_oracle(q, keys, alpha, beta, **args),
                   _baseline(dtype, q, keys, alpha, beta, **args))
    checks = [("row_lse", row, own.row_lse, own_base and own_base.row_lse),
              ("col_lse", col, own.col_lse, own_base and own_base.col_lse),
              ("dq", dq, truth.dq, base and base.dq),
              ("dkeys", dkeys, truth.dkeys, base and base.dkeys)]
    if backends.PROPERTIES[backend].fuses_gradient:
        lse, dq, dkeys = OPS.masked_lse_forward_with_grad(
            q, keys, alpha, beta, row_grad, None, None, None, True, 0, True, True, backend)
        truth, base = (masked_lse_oracle(q, keys, alpha, beta, row_grad=row_grad, **masks),
                       _baseline(dtype, q, keys, alpha, beta, row_grad=row_grad, **masks))
        checks += [("fused row_lse", lse, truth.row_lse, base and base.row_lse),
                   ("fused dq", dq, truth.dq, base and base.dq),
                   ("fused dkeys", dkeys, truth.dkeys, base and base.dkeys)]
    for name, got, expected, baseline in checks:
        _check(got, expected, baseline, dtype, name, gradient="lse" not in name,
               max_logit=max_logit)


@pytest.mark.parametrize("backend", list(backends.PROPERTIES))
def test_minus_inf_lse_contributes_nothing(backend):
    """An lse of -inf given to the backward contributes 0 (never NaN), even where the row or
    column has entries; the other rows and columns are unaffected."""
    _skip_unavailable(backend)
    q, keys, alpha, beta = _problem(backend, 6, 5, 4, torch.float32)
    vec = _vector_dtype(backend, torch.float32)
    own = masked_lse_oracle(q, keys, alpha, beta)
    row_lse, col_lse = (t.to(device=q.device, dtype=vec) for t in (own.row_lse, own.col_lse))
    row_lse[1], col_lse[2] = float("-inf"), float("-inf")
    grads = [torch.randn(k, dtype=vec, device=q.device) for k in (6, 5)]
    dq, dkeys = OPS.masked_lse_backward(q, keys, alpha, beta, row_lse, grads[0], col_lse,
                                        grads[1], None, None, False, 0, True, True, backend)
    truth = masked_lse_oracle(q, keys, alpha, beta, row_lse=row_lse, row_grad=grads[0],
                              col_lse=col_lse, col_grad=grads[1])
    _check(dq, truth.dq, None, torch.float32, "dq", gradient=True)
    _check(dkeys, truth.dkeys, None, torch.float32, "dkeys", gradient=True)


@pytest.mark.parametrize("n,m", [(0, 4), (5, 0)])
@pytest.mark.parametrize("backend", list(backends.PROPERTIES))
def test_empty_inputs(backend, n, m):
    """N = 0 or M = 0: lse of no entry is -inf, gradients are zeros of the right shape."""
    _skip_unavailable(backend)
    q, keys, alpha, beta = _problem(backend, n, m, 8, torch.float32)
    vec = _vector_dtype(backend, torch.float32)
    row, col = OPS.masked_lse_forward(q, keys, alpha, beta, None, None, False, 0, True, backend)
    assert row.shape == (n,) and torch.isneginf(row).all()
    assert col.shape == (m,) and torch.isneginf(col).all()
    ones = [torch.ones(k, dtype=vec, device=q.device) for k in (n, m)]
    grads = OPS.masked_lse_backward(q, keys, alpha, beta, row, ones[0], col, ones[1], None, None,
                                    False, 0, True, True, backend)
    if backends.PROPERTIES[backend].fuses_gradient:
        lse, *fused = OPS.masked_lse_forward_with_grad(q, keys, alpha, beta, ones[0], None, None,
                                                       None, False, 0, True, True, backend)
        assert lse.shape == (n,) and torch.isneginf(lse).all()
        grads = list(grads) + fused
    for k, grad in enumerate(grads):
        shape = (n, 8) if k % 2 == 0 else (m, 8)
        assert torch.equal(grad.cpu(), torch.zeros(shape)), f"gradient {k}: {grad}"


@pytest.mark.parametrize("backend", list(backends.PROPERTIES))
def test_non_contiguous_inputs(backend):
    """The ops take any layout (they pass contiguous copies to the kernels)."""
    _skip_unavailable(backend)
    q, keys, alpha, beta = _problem(backend, 9, 14, 6, torch.float32)
    q_t, keys_t = q.t().contiguous().t(), keys.t().contiguous().t()
    assert not q_t.is_contiguous()
    vec = _vector_dtype(backend, torch.float32)
    row_grad = torch.randn(18, dtype=vec, device=q.device)[::2]
    row, _ = OPS.masked_lse_forward(q_t, keys_t, alpha, beta, None, None, True, 1, False, backend)
    dq, dkeys = OPS.masked_lse_backward(q_t, keys_t, alpha, beta, row, row_grad, None, None, None,
                                        None, True, 1, True, True, backend)
    truth = masked_lse_oracle(q, keys, alpha, beta, row_grad=row_grad, exclude_diag=True,
                              diag_offset=1)
    _check(row, truth.row_lse, None, torch.float32, "row_lse")
    _check(dq, truth.dq, None, torch.float32, "dq", gradient=True)
    _check(dkeys, truth.dkeys, None, torch.float32, "dkeys", gradient=True)


@pytest.mark.parametrize("backend", list(backends.PROPERTIES))
def test_fake_kernels_match_the_kernels(backend):
    """The fake kernels (meta tensors, torch.compile) give the shapes and dtypes of the real."""
    _skip_unavailable(backend)
    dtype = torch.float32
    q, keys, alpha, beta = _problem(backend, 7, 5, 3, dtype)
    vec = _vector_dtype(backend, dtype)
    g = torch.ones(7, dtype=vec, device=q.device)
    calls = [lambda q, k, a, b, g: OPS.masked_lse_forward(q, k, a, b, None, None, False, 0, flag,
                                                          backend) for flag in (False, True)]
    calls += [lambda q, k, a, b, g, need=need: OPS.masked_lse_backward(
        q, k, a, b, g, g, None, None, None, None, False, 0, *need, backend)
        for need in ((True, True), (True, False), (False, False))]
    if backends.PROPERTIES[backend].fuses_gradient:
        calls += [lambda q, k, a, b, g: OPS.masked_lse_forward_with_grad(
            q, k, a, b, g, None, None, None, False, 0, True, False, backend)]
    for call in calls:
        real = call(q, keys, alpha, beta, g)
        fake = call(*(t.to("meta") for t in (q, keys, alpha, beta, g)))
        assert [(t.shape, t.dtype) for t in real] == [(t.shape, t.dtype) for t in fake]


def test_oracle_is_the_gradient_of_the_lse():
    """The oracle's dS formula is the gradient of sum_i g_i row_lse_i + sum_j c_j col_lse_j,
    with masks by diagonal offset and by ids."""
    f64 = torch.float64
    q, keys = torch.randn(45, 20, dtype=f64), torch.randn(38, 20, dtype=f64)
    alpha, beta = 10.0 / q.norm(dim=1), 1.0 / keys.norm(dim=1)
    g, c = torch.randn(45, dtype=f64), torch.randn(38, dtype=f64)
    masks = dict(exclude_diag=True, diag_offset=1, row_ids=torch.randint(-1, 4, (45,)),
                 col_ids=torch.randint(-1, 4, (38,)))
    qa, ka = q.clone().requires_grad_(), keys.clone().requires_grad_()
    own = masked_lse_oracle(qa, ka, alpha, beta, **masks)  # detached inputs: no graph
    s = masked_scores(qa, ka, alpha, beta, **masks)
    s_live = alpha[:, None] * beta[None, :] * (qa @ ka.T)
    s_live = torch.where(torch.isneginf(s), s, s_live)
    ((g * torch.logsumexp(s_live, 1)).sum() + (c * torch.logsumexp(s_live, 0)).sum()).backward()
    truth = masked_lse_oracle(q, keys, alpha, beta, row_grad=g, col_grad=c, **masks)
    torch.testing.assert_close(torch.logsumexp(s_live, 1).detach(), own.row_lse)
    torch.testing.assert_close(truth.dq, qa.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(truth.dkeys, ka.grad, rtol=1e-12, atol=1e-12)
