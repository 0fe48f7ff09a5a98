"""SigLIP's pairwise sigmoid loss in tiles: the Triton forward and backward kernels.

    z_ij = scale * <x_i, y_j> + bias,   t_ij = -y_ij z_ij   (y_ij = +1 iff i == j)
    forward:  loss_i = sum_j softplus(t_ij)
    backward: dz_ij = -g_i y_ij sigmoid(t_ij);  gx_i = sum_j dz_ij y_j,  gy_j = sum_i dz_ij x_i

The (N, M) logits are never stored. The forward streams text tiles past a block of image rows
and keeps one running sum per row: no max, no rescaling, the terms of a sigmoid loss are
independent. The backward recomputes each tile (FlashAttention style) and is launched twice:
for gx (grid over image blocks, looping over texts) and for gy (grid over text blocks, looping
over images, the tile seen transposed; the labels are symmetric). Each program owns its output
rows: no atomics, deterministic results.

Read top to bottom: @triton.jit helpers and the two kernels, then the host functions
``siglip_forward`` / ``siglip_backward`` (validation, block choice, launch). The tile loaders and
the (one chunk or D-chunked) tile dot product are shared with the InfoNCE kernels
(kernels/_common.py).

Numerics: fp32 accumulation whatever the input dtype; softplus(t) = max(t, 0) + log1p(exp(-|t|))
with log1p(e) = log(u) e / (u - 1), u = 1 + e (exact to rounding also where 1 + e rounds to 1:
the tiny terms of the negatives keep full relative precision); sigmoid from the same exp(-|t|).
Finite for any |z|.
"""

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES  # noqa: F401 (the dtypes these kernels take)
from ._common import (_block_config, _check_device, _check_matrix, _device_context, _grad_scale,
                      _input_precision, _load_rows, _tile_dots, _upcast, new_output)

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _signed_logits(dots, scale, bias, offs_r, offs_c):
    """t = -y_rc z_rc: z = scale * dots + bias, negated where column c == row r (the positive)."""
    z = dots * scale + bias
    return tl.where(offs_c[None, :] == offs_r[:, None], -z, z)


@triton.jit
def _softplus_sigmoid(t):
    """(softplus(t), sigmoid(t)) from e = exp(-|t|) in (0, 1], stable for any |t|."""
    e = tl.exp(-tl.abs(t))
    u = 1.0 + e
    # log1p(e) = log(u) * e / (u - 1) (Goldberg): exact to rounding even where u rounds to 1.
    # (u - 1 is replaced where it is 0, so that the branch not taken divides by nothing.)
    log1p_e = tl.where(u == 1.0, e, tl.log(u) * (e / tl.where(u == 1.0, 1.0, u - 1.0)))
    r = 1.0 / u
    return tl.maximum(t, 0.0) + log1p_e, tl.where(t >= 0.0, r, e * r)


@triton.jit
def _siglip_fwd_kernel(
    X, Y, Params,               # x (N, D), y (M, D) row-major; Params (2,) fp32 = (scale, bias)
    Loss,                       # out: (N,) fp32 per-row loss
    N, M, D, stride_x, stride_y,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    ONE_D_CHUNK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # int64 program offsets: row * stride reaches N * D, past 2^31 at the sizes we target.
    pid = tl.program_id(0).to(tl.int64)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    scale = tl.load(Params)
    bias = tl.load(Params + 1)
    x_tile = _load_rows(X, offs_n, mask_n, stride_x, 0, D, BLOCK_D, UPCAST)  # resident if one chunk
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    arange_m = tl.arange(0, BLOCK_M).to(tl.int64)
    for mb in range(0, tl.cdiv(M, BLOCK_M)):
        offs_m = mb * BLOCK_M + arange_m
        mask_m = offs_m < M
        dots, _ = _tile_dots(X, Y, x_tile, offs_n, offs_m, mask_n, mask_m, stride_x, stride_y, D,
                             BLOCK_N, BLOCK_M, BLOCK_D, ONE_D_CHUNK, UPCAST, INPUT_PRECISION)
        loss, _ = _softplus_sigmoid(_signed_logits(dots, scale, bias, offs_n, offs_m))
        acc += tl.sum(tl.where(mask_m[None, :], loss, 0.0), axis=1)
    tl.store(Loss + offs_n, acc, mask=mask_n)


@triton.jit
def _siglip_bwd_kernel(
    X, Y, Params, Grad,         # outer (NX, D), inner (NY, D); (scale, bias); g (image rows) fp32
    InvGradScale,               # (1,) fp32 1/G: dz / G is in [-1, 1] before the cast for tl.dot
    GX, DzSum,                  # out: GX (NX, D) fp32 = G^-1 sum_j dz_ij y_j,
                                # DzSum (NX,) fp32 = sum_j dz_ij
    NX, NY, D, stride_x, stride_y, stride_gx,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
    GRAD_ON_OUTER: tl.constexpr, ACCUMULATE: tl.constexpr,
    ONE_D_CHUNK: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """gx: X = images, Y = texts, g indexed by the outer row (GRAD_ON_OUTER). gy: X = texts,
    Y = images, g indexed by the inner row. Without ACCUMULATE only DzSum is computed (d bias)."""
    pid = tl.program_id(0).to(tl.int64)  # int64: row * stride passes 2^31 on large inputs
    offs_x = pid * BLOCK_X + tl.arange(0, BLOCK_X)
    mask_x = offs_x < NX
    offs_d = tl.arange(0, BLOCK_D)
    scale = tl.load(Params)
    bias = tl.load(Params + 1)
    inv_gs = tl.load(InvGradScale)
    if GRAD_ON_OUTER:
        g_x = tl.load(Grad + offs_x, mask=mask_x, other=0.0)
    x_tile = _load_rows(X, offs_x, mask_x, stride_x, 0, D, BLOCK_D, UPCAST)  # resident if one chunk
    acc = tl.zeros((BLOCK_X, BLOCK_D), dtype=tl.float32)
    dz_sum = tl.zeros((BLOCK_X,), dtype=tl.float32)
    arange_y = tl.arange(0, BLOCK_Y).to(tl.int64)
    for yb in range(0, tl.cdiv(NY, BLOCK_Y)):
        offs_y = yb * BLOCK_Y + arange_y
        mask_y = offs_y < NY
        dots, y_tile = _tile_dots(X, Y, x_tile, offs_x, offs_y, mask_x, mask_y, stride_x,
                                  stride_y, D, BLOCK_X, BLOCK_Y, BLOCK_D, ONE_D_CHUNK, UPCAST,
                                  INPUT_PRECISION)
        t = _signed_logits(dots, scale, bias, offs_x, offs_y)
        _, sig = _softplus_sigmoid(t)
        if GRAD_ON_OUTER:
            dz = sig * g_x[:, None]
        else:
            dz = sig * tl.load(Grad + offs_y, mask=mask_y, other=0.0)[None, :]
        # d t / d z = -y: +1 off the diagonal, -1 on it; 0 outside the matrix.
        dz = tl.where(offs_y[None, :] == offs_x[:, None], -dz, dz)
        dz = tl.where(mask_x[:, None] & mask_y[None, :], dz, 0.0)
        dz_sum += tl.sum(dz, axis=1)
        if ACCUMULATE:
            dz_in = dz * inv_gs
            if not UPCAST:
                dz_in = dz_in.to(Y.dtype.element_ty)  # fp16/bf16 tensor-core operand
            if ONE_D_CHUNK:
                acc = tl.dot(dz_in, y_tile, acc, input_precision=INPUT_PRECISION)
            else:
                # D in chunks: this program's own rows of GX (fp32) hold the running sum. The
                # barrier orders the previous iteration's stores before these loads.
                tl.debug_barrier()
                for d0 in range(0, D, BLOCK_D):
                    part = tl.dot(dz_in, _load_rows(Y, offs_y, mask_y, stride_y, d0, D, BLOCK_D,
                                                    UPCAST), input_precision=INPUT_PRECISION)
                    cols = d0 + offs_d
                    ptrs = GX + offs_x[:, None] * stride_gx + cols[None, :]
                    inside = mask_x[:, None] & (cols[None, :] < D)
                    if yb > 0:
                        part += tl.load(ptrs, mask=inside, other=0.0)
                    tl.store(ptrs, part, mask=inside)
    tl.store(DzSum + offs_x, dz_sum, mask=mask_x)
    if ACCUMULATE and ONE_D_CHUNK:
        ptrs = GX + offs_x[:, None] * stride_gx + offs_d[None, :]
        tl.store(ptrs, acc, mask=mask_x[:, None] & (offs_d[None, :] < D))


# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------

# Launch configurations (the keys of _common._block_config): rows per program, inner rows per
# tile, the largest D run as one chunk, the chunk size for larger D, num_warps, num_stages. One
# config per case, no autotuning (a multi-config autotune breaks the interpreter). Not yet tuned
# on a GPU: tensor-core tiles as FlashAttention, smaller tiles for full-precision fp32 (its tl.dot
# runs from registers), few large tiles in the interpreter.
_GPU_TENSOR_CORE = dict(block_x=128, block_y=64, max_block_d=128, chunk_d=64, num_warps=8,
                        num_stages=3)
_GPU_IEEE = dict(block_x=64, block_y=64, max_block_d=32, chunk_d=32, num_warps=8, num_stages=2)
_INTERPRETER = dict(block_x=128, block_y=128, max_block_d=128, chunk_d=128, num_warps=4,
                    num_stages=1)


def _check_inputs(x, y, scale, bias):
    """Validate the operands; return (N, M, D) and the (2,) fp32 (scale, bias) tensor."""
    _check_matrix("x", x)
    _check_matrix("y", y)
    if y.dtype != x.dtype:
        raise TypeError(f"y must have the dtype of x ({x.dtype}), got {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"y must be on {x.device} (the device of x), got {y.device}")
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"y must have D = {x.shape[1]} columns like x, got shape {tuple(y.shape)}")
    _check_device("x", x.device)
    for name, value in (("scale", scale), ("bias", bias)):
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise TypeError(f"{name} must be a 0-dim tensor, got {value!r}")
    params = torch.stack([scale.detach(), bias.detach()]).to(device=x.device, dtype=torch.float32)
    return x.shape[0], y.shape[0], x.shape[1], params


def _launch_options(x, D, blocks):
    """(block_x, block_y, the launch options shared by the forward and backward kernels)."""
    precision = _input_precision(x.dtype)
    bx, by, bd, one, warps, stages = _block_config(D, precision, blocks,
                                                   tensor_core=_GPU_TENSOR_CORE, ieee=_GPU_IEEE,
                                                   interpreter=_INTERPRETER)
    options = dict(BLOCK_D=bd, ONE_D_CHUNK=one, UPCAST=_upcast(x.dtype), INPUT_PRECISION=precision,
                   num_warps=warps, num_stages=stages)
    return bx, by, options


def siglip_forward(x, y, scale, bias, *, blocks=None):
    """Per-row loss (N,) fp32: loss_i = sum_j softplus(-y_ij (scale <x_i, y_j> + bias)).

    x (N, D), y (M, D): one dtype of SUPPORTED_DTYPES, one device, rows contiguous; scale and
    bias: 0-dim tensors. ``blocks`` optionally overrides (block_rows, block_texts, block_d)."""
    N, M, D, params = _check_inputs(x, y, scale, bias)
    loss = new_output(N, torch.float32, x.device)
    bx, by, options = _launch_options(x, D, blocks)
    with _device_context(x):
        _siglip_fwd_kernel[(triton.cdiv(N, bx),)](
            x, y, params, loss, N, M, D, x.stride(0), y.stride(0),
            BLOCK_N=bx, BLOCK_M=by, **options)
    return loss


def siglip_backward(x, y, scale, bias, row_grad, *, need_gx=True, need_gy=True, blocks=None):
    """(gx (N, D) fp32 or None, gy (M, D) fp32 or None, dz_total 0-dim fp32), recomputing the
    tiles: dz_ij = -row_grad_i y_ij sigmoid(-y_ij z_ij), gx_i = sum_j dz_ij y_j,
    gy_j = sum_i dz_ij x_i, dz_total = sum_ij dz_ij. row_grad: (N,) fp32 on x's device."""
    N, M, D, params = _check_inputs(x, y, scale, bias)
    if (not isinstance(row_grad, torch.Tensor) or row_grad.dtype != torch.float32
            or row_grad.shape != (N,) or row_grad.device != x.device):
        raise ValueError(f"row_grad must be a float32 tensor of shape ({N},) on {x.device}, got "
                         f"{getattr(row_grad, 'dtype', type(row_grad).__name__)} "
                         f"{tuple(getattr(row_grad, 'shape', ()))}")
    row_grad = row_grad.contiguous()
    gs = _grad_scale(row_grad.abs().amax())  # G = max |g|
    inv_gs = gs.reciprocal()
    bx, by, options = _launch_options(x, D, blocks)
    gx = gy = dz_total = None
    with _device_context(x):
        # The image-side launch also yields d bias (row sums of dz): run it unless only gy is
        # wanted.
        if need_gx or not need_gy:
            dz_rows = new_output(N, torch.float32, x.device)
            # Without need_gx, GX is never written: dz_rows stands in for it.
            gx = new_output((N, D), torch.float32, x.device) if need_gx else dz_rows
            _siglip_bwd_kernel[(triton.cdiv(N, bx),)](
                x, y, params, row_grad, inv_gs, gx, dz_rows, N, M, D, x.stride(0), y.stride(0),
                gx.stride(0) if need_gx else 0, BLOCK_X=bx, BLOCK_Y=by, GRAD_ON_OUTER=True,
                ACCUMULATE=need_gx, **options)
            dz_total = dz_rows.sum()
        if need_gy:
            gy = new_output((M, D), torch.float32, x.device)
            dz_cols = new_output(M, torch.float32, x.device)
            _siglip_bwd_kernel[(triton.cdiv(M, bx),)](
                y, x, params, row_grad, inv_gs, gy, dz_cols, M, N, D, y.stride(0), x.stride(0),
                gy.stride(0), BLOCK_X=bx, BLOCK_Y=by, GRAD_ON_OUTER=False, ACCUMULATE=True,
                **options)
            if dz_total is None:
                dz_total = dz_cols.sum()
    gx = gx.mul_(gs) if need_gx else None
    gy = gy.mul_(gs) if need_gy else None
    return gx, gy, dz_total
