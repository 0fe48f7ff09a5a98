"""The Matryoshka log-sum-exps in Triton: every leading-dimension prefix of one product in one pass
over the key tiles (the contract is fastcontrast/infonce/matryoshka_ops.py's). With prefix
bounds 0 = b_0 < ... < b_P (chunk c: dimensions b_c .. b_{c+1}):

    S^p_ij = sum_{c <= p} <x_i[chunk c], y_j[chunk c]>,   s^p_ij = ax_pi by_pj S^p_ij
    forward:  lse_pi = logsumexp_j s^p_ij (masked j == i with EXCLUDE_DIAG)
    backward: dS^p_ij = gx_pi exp(s^p_ij - lse_x_pi) + gy_pj exp(s^p_ij - lse_y_pj)
              dX[:, chunk c] = G_c Y[:, chunk c],  G_c = sum_{p >= c} ax_p by_p dS^p
              dax_pi = sum_j dS^p_ij by_pj S^p_ij

``_matryoshka_fwd_kernel``: grid over blocks of X rows, each program loops over all Y blocks;
per Y tile the chunk products accumulate into one fp32 tile and after chunk p it is prefix p's
score tile, merged into that prefix's running (max, sum) (a (BLOCK_X, P) pair of tensors, the
prefix's column selected by a mask: Triton has no lists of tensors). The column lse of the
symmetric loss is the same kernel with the roles of X and Y exchanged.

``_matryoshka_bwd_kernel``: the gradient with respect to one operand (X), looping over the other;
launched twice (X = q, then X = keys with the tile seen transposed: dS is symmetric in the roles
of its row and column terms). Per Y tile it forms S^{P-1} (all chunks), then walks the prefixes
down: adds ax_p by_p dS^p into the fold G, updates dX's chunk p with G Y[:, chunk p] (a
read-modify-write of the program's own fp32 rows: no atomics), and takes chunk p's product off
the score tile to get S^{p-1}. So the backward costs 3 chunk-products of D per tile (forward
recompute, the subtraction, dX) whatever the number of prefixes; the subtraction rounds S^p
differently from the forward's sum (a relative 1e-7 on the scores in fp32).

Accumulation is fp32 whatever the input dtype; outputs are fp32. Not yet run on a GPU: the
block sizes are the interpreter's and a first GPU guess.
"""
import torch
import triton
import triton.language as tl

from ._lse_tiles import LN2, LOG2E
from ._common import (_INTERPRET, _check_device, _check_matrix, _device_context,
                      _input_precision, _load_rows, _upcast)

__all__ = ["matryoshka_lse_forward", "matryoshka_lse_backward"]

# (block_x, block_y, block_d, num_warps): the interpreter runs few, large tiles fastest.
_CONFIG = dict(block_x=64, block_y=64, block_d=32, num_warps=4) if _INTERPRET else dict(
    block_x=64, block_y=32, block_d=32, num_warps=8)
# Software-pipeline depth of the forward: fp32 tiles held for a deeper pipeline spill registers
# on sm_90 (ptxas, tests/kernels/test_triton_compile_objectives.py).
_FORWARD_STAGES = {torch.float32: 1}


@triton.jit
def _prefix_product(X, Y, Bounds, acc, offs_x, offs_y, mask_x, mask_y, stride_x, stride_y,
                    p, sign, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr):
    """acc + sign * <x_i[chunk p], y_j[chunk p]> over the chunk's columns in BLOCK_D steps."""
    lo = tl.load(Bounds + p)
    hi = tl.load(Bounds + p + 1)
    for d0 in range(lo, hi, BLOCK_D):
        x = _load_rows(X, offs_x, mask_x, stride_x, d0, hi, BLOCK_D, UPCAST)
        y = _load_rows(Y, offs_y, mask_y, stride_y, d0, hi, BLOCK_D, UPCAST)
        acc += sign * tl.dot(x, tl.trans(y), input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _x_block(NX, BLOCK_X: tl.constexpr):
    """(rows, in-range mask) of this program's block of X (int64: row * stride passes 2^31)."""
    offs_x = tl.program_id(0).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X)
    return offs_x, offs_x < NX


@triton.jit
def _y_block(y0, NY, offs_x, mask_x, BLOCK_Y: tl.constexpr, EXCLUDE_DIAG: tl.constexpr):
    """(rows, in-range mask, candidate mask of the tile) of the Y block at y0."""
    offs_y = y0 + tl.arange(0, BLOCK_Y)
    mask_y = offs_y < NY
    valid = mask_x[:, None] & mask_y[None, :]
    if EXCLUDE_DIAG:
        valid = valid & (offs_x[:, None] != offs_y[None, :])
    return offs_y, mask_y, valid


@triton.jit
def _scales(AX, BY, p, NX, NY, offs_x, offs_y, mask_x, mask_y):
    """Prefix p's scales of the tile's rows and columns."""
    a = tl.load(AX + p * NX + offs_x, mask=mask_x, other=0.0)
    b = tl.load(BY + p * NY + offs_y, mask=mask_y, other=0.0)
    return a, b


@triton.jit
def _matryoshka_fwd_kernel(X, Y, AX, BY, Bounds, Lse, NX, NY, stride_x, stride_y,
                           P: tl.constexpr, P_PAD: tl.constexpr, BLOCK_X: tl.constexpr,
                           BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
                           EXCLUDE_DIAG: tl.constexpr, UPCAST: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr):
    """Lse (P, NX) fp32 of every prefix; grid (cdiv(NX, BLOCK_X),). FLOPs 2 NX NY b_P + P NX NY
    exp2; bytes ~ e NX NY b_P (1 / BLOCK_X + 1 / BLOCK_Y) of streamed chunks, mostly L2."""
    offs_x, mask_x = _x_block(NX, BLOCK_X)
    prefix = tl.arange(0, P_PAD)
    run_max = tl.full((BLOCK_X, P_PAD), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_X, P_PAD), tl.float32)
    for y0 in range(0, NY, BLOCK_Y):
        offs_y, mask_y, valid = _y_block(y0, NY, offs_x, mask_x, BLOCK_Y, EXCLUDE_DIAG)
        acc = tl.zeros((BLOCK_X, BLOCK_Y), tl.float32)
        for p in tl.static_range(P):  # after chunk p, acc holds S^p
            acc = _prefix_product(X, Y, Bounds, acc, offs_x, offs_y, mask_x, mask_y, stride_x,
                                  stride_y, p, 1.0, BLOCK_D, UPCAST, INPUT_PRECISION)
            a, b = _scales(AX, BY, p, NX, NY, offs_x, offs_y, mask_x, mask_y)
            s = tl.where(valid, acc * (a * LOG2E)[:, None] * b[None, :], float("-inf"))
            sel = prefix[None, :] == p
            m_old = tl.max(tl.where(sel, run_max, float("-inf")), axis=1)
            l_old = tl.sum(tl.where(sel, run_sum, 0.0), axis=1)
            m_new = tl.maximum(m_old, tl.max(s, axis=1))
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_new = l_old * tl.exp2(m_old - shift) + tl.sum(tl.exp2(s - shift[:, None]), axis=1)
            run_max = tl.where(sel, m_new[:, None], run_max)
            run_sum = tl.where(sel, l_new[:, None], run_sum)
    stored = mask_x[:, None] & (prefix[None, :] < P)
    run_sum = tl.where(stored, run_sum, 1.0)  # no log of the padding's 0
    lse = (tl.where(run_max == float("-inf"), 0.0, run_max) + tl.log2(run_sum)) * LN2
    tl.store(Lse + prefix[None, :] * NX + offs_x[:, None], lse, mask=stored)


@triton.jit
def _matryoshka_bwd_kernel(X, Y, AX, BY, Bounds, LseX, GX, LseY, GY, DX, DAX, NX, NY, stride_x,
                           stride_y, stride_dx, P: tl.constexpr, P_PAD: tl.constexpr,
                           BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
                           EXCLUDE_DIAG: tl.constexpr, HAS_X_TERM: tl.constexpr,
                           HAS_Y_TERM: tl.constexpr, UPCAST: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr):
    """DX (NX, D) fp32 (zero-initialised, chunk columns accumulated) and DAX (P, NX) fp32; grid
    (cdiv(NX, BLOCK_X),). LseX / LseY hold +inf where a row has no candidate. FLOPs 6 NX NY b_P
    + 2 P NX NY exp; bytes as the forward's, plus 8 NX b_P NY / BLOCK_Y of dX rows (L2)."""
    offs_x, mask_x = _x_block(NX, BLOCK_X)
    prefix = tl.arange(0, P_PAD)
    dax = tl.zeros((BLOCK_X, P_PAD), tl.float32)
    for y0 in range(0, NY, BLOCK_Y):
        offs_y, mask_y, valid = _y_block(y0, NY, offs_x, mask_x, BLOCK_Y, EXCLUDE_DIAG)
        acc = tl.zeros((BLOCK_X, BLOCK_Y), tl.float32)
        for c in tl.static_range(P):  # S^{P-1}: every chunk
            acc = _prefix_product(X, Y, Bounds, acc, offs_x, offs_y, mask_x, mask_y, stride_x,
                                  stride_y, c, 1.0, BLOCK_D, UPCAST, INPUT_PRECISION)
        fold = tl.zeros((BLOCK_X, BLOCK_Y), tl.float32)
        for q in tl.static_range(P):
            p = P - 1 - q
            a, b = _scales(AX, BY, p, NX, NY, offs_x, offs_y, mask_x, mask_y)
            s = acc * a[:, None] * b[None, :]
            ds = tl.zeros((BLOCK_X, BLOCK_Y), tl.float32)
            if HAS_X_TERM:
                lse_x = tl.load(LseX + p * NX + offs_x, mask=mask_x, other=float("inf"))
                gx = tl.load(GX + p * NX + offs_x, mask=mask_x, other=0.0)
                ds += gx[:, None] * tl.exp2((s - lse_x[:, None]) * LOG2E)
            if HAS_Y_TERM:
                lse_y = tl.load(LseY + p * NY + offs_y, mask=mask_y, other=float("inf"))
                gy = tl.load(GY + p * NY + offs_y, mask=mask_y, other=0.0)
                ds += gy[None, :] * tl.exp2((s - lse_y[None, :]) * LOG2E)
            ds = tl.where(valid, ds, 0.0)
            dax += tl.where(prefix[None, :] == p,
                            tl.sum(ds * b[None, :] * acc, axis=1)[:, None], 0.0)
            fold += ds * a[:, None] * b[None, :]
            lo = tl.load(Bounds + p)
            hi = tl.load(Bounds + p + 1)
            for d0 in range(lo, hi, BLOCK_D):
                y = _load_rows(Y, offs_y, mask_y, stride_y, d0, hi, BLOCK_D, UPCAST)
                offs_d = d0 + tl.arange(0, BLOCK_D)
                ptrs = DX + offs_x[:, None] * stride_dx + offs_d[None, :]
                keep = mask_x[:, None] & (offs_d[None, :] < hi)
                update = tl.dot(fold, y.to(tl.float32), input_precision=INPUT_PRECISION)
                tl.store(ptrs, tl.load(ptrs, mask=keep, other=0.0) + update, mask=keep)
            if p > 0:
                acc = _prefix_product(X, Y, Bounds, acc, offs_x, offs_y, mask_x, mask_y,
                                      stride_x, stride_y, p, -1.0, BLOCK_D, UPCAST,
                                      INPUT_PRECISION)
    tl.store(DAX + prefix[None, :] * NX + offs_x[:, None], dax,
             mask=mask_x[:, None] & (prefix[None, :] < P))


def _check(x, y, alpha, beta, bounds):
    _check_matrix("x", x)
    _check_matrix("y", y)
    _check_device("x", x.device)
    if y.dtype != x.dtype or y.shape[1] != x.shape[1]:
        raise ValueError(f"y must have the dtype and feature dim of x ({x.dtype}, "
                         f"{x.shape[1]}), got {y.dtype}, {y.shape[1]}")
    p = len(bounds) - 1
    if (alpha.shape != (p, x.shape[0])) or (beta.shape != (p, y.shape[0])):
        raise ValueError(f"alpha / beta must have shapes {(p, x.shape[0])} / {(p, y.shape[0])}, "
                         f"got {tuple(alpha.shape)} / {tuple(beta.shape)}")


def _meta(x, bounds):
    p = len(bounds) - 1
    return dict(P=p, P_PAD=max(2, triton.next_power_of_2(p)), BLOCK_X=_CONFIG["block_x"],
                BLOCK_Y=_CONFIG["block_y"], BLOCK_D=_CONFIG["block_d"], UPCAST=_upcast(x.dtype),
                INPUT_PRECISION=_input_precision(x.dtype), num_warps=_CONFIG["num_warps"])


def _forward(x, y, ax, by, bounds_t, bounds, exclude_diag):
    lse = torch.empty(len(bounds) - 1, x.shape[0], dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(x.shape[0], _CONFIG["block_x"]),)
    _matryoshka_fwd_kernel[grid](x, y, ax, by, bounds_t, lse, x.shape[0], y.shape[0],
                                 x.stride(0), y.stride(0), EXCLUDE_DIAG=exclude_diag,
                                 num_stages=_FORWARD_STAGES.get(x.dtype, 3), **_meta(x, bounds))
    return lse


def _operands(x, y, alpha, beta, bounds):
    _check(x, y, alpha, beta, bounds)
    bounds_t = torch.tensor(list(bounds), dtype=torch.int32, device=x.device)
    return alpha.float().contiguous(), beta.float().contiguous(), bounds_t


def matryoshka_lse_forward(x, y, alpha, beta, bounds, *, exclude_diag=False, with_col_lse=False):
    """(row_lse (P, N), col_lse (P, M) or None), fp32; -inf where no candidate."""
    alpha, beta, bounds_t = _operands(x, y, alpha, beta, bounds)
    with _device_context(x):
        row = _forward(x, y, alpha, beta, bounds_t, bounds, exclude_diag)
        col = _forward(y, x, beta, alpha, bounds_t, bounds, exclude_diag) if with_col_lse else None
    return row, col


def _gradient(x, y, ax, by, bounds_t, bounds, x_term, y_term, exclude_diag):
    """(dX (NX, D), dax (P, NX)) fp32 for the terms (lse (+inf for -inf), grad) or None."""
    dx = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    dax = torch.empty(ax.shape, dtype=torch.float32, device=x.device)
    placeholder = (ax, ax)
    lse_x, gx = x_term or placeholder
    lse_y, gy = y_term or (by, by)
    grid = (triton.cdiv(x.shape[0], _CONFIG["block_x"]),)
    _matryoshka_bwd_kernel[grid](x, y, ax, by, bounds_t, lse_x, gx, lse_y, gy, dx, dax,
                                 x.shape[0], y.shape[0], x.stride(0), y.stride(0), dx.stride(0),
                                 EXCLUDE_DIAG=exclude_diag, HAS_X_TERM=x_term is not None,
                                 HAS_Y_TERM=y_term is not None, **_meta(x, bounds))
    return dx, dax


def _term(lse, grad):
    if lse is None:
        return None
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
    return lse.float().contiguous(), grad.float().contiguous()


def matryoshka_lse_backward(x, y, alpha, beta, bounds, row_lse, row_grad, col_lse=None,
                            col_grad=None, *, exclude_diag=False):
    """(dx (N, D), dy (M, D), dalpha (P, N), dbeta (P, M)), fp32."""
    alpha, beta, bounds_t = _operands(x, y, alpha, beta, bounds)
    rows, cols = _term(row_lse, row_grad), _term(col_lse, col_grad)
    with _device_context(x):
        dx, dalpha = _gradient(x, y, alpha, beta, bounds_t, bounds, rows, cols, exclude_diag)
        dy, dbeta = _gradient(y, x, beta, alpha, bounds_t, bounds, cols, rows, exclude_diag)
    return dx, dy, dalpha, dbeta
