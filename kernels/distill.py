"""Similarity distillation in tiles: the Triton forward and backward kernels.

    s_ij = s_scale <sq_i, sk_j>,  t_ij = t_scale <tq_i, tk_j>   (teacher: its own D)
    forward:  per row, lse^S_i, lse^T_i and w_i = sum_j softmax_j(t_i.) s_ij  (stats (3, N))
    backward: G_ij = a_i P^S_ij - g_i P^T_ij + ca_j Pc^S_ij - c_j Pc^T_ij;  gq = G sk,
              gk = G^T sq  (the student weights a, ca: g, c unless given)

Neither score matrix is stored. The forward streams key tiles past a block of query rows, both
scores of each tile computed from the features, and keeps per row the running maxima, the sums
of exps and the teacher-weighted sum of student scores; a larger teacher maximum rescales that
sum with the teacher's sum (flash attention's online softmax). The column statistics of the
symmetric loss are the row statistics of the transposed problem: the same kernel, keys and
queries swapped. The backward recomputes both tiles and is launched twice, for gq (grid over
query blocks) and for gk (grid over key blocks, the transposed problem: row and column terms
swap roles); each program owns its output rows: no atomics.

Numerics: fp32 accumulation whatever the input dtype; G is divided by
G_max = max(|g|, |a|) + max(|c|, |ca|) before the cast to the input dtype for tl.dot, and
multiplied back in fp32 on the host.
"""

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES  # noqa: F401 (the dtypes these kernels take)
from ._common import (_block_config, _block_rows, _check_device, _check_matrix, _device_context,
                      _dot_rows, _grad_scale, _input_precision, _load_rows, _upcast, new_output)

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _scales(Scales):
    """(s_scale, t_scale), the student's and the teacher's logit scales."""
    return tl.load(Scales), tl.load(Scales + 1)


@triton.jit
def _tile_scores(SQ, SK, TQ, TK, offs_x, mask_x, offs_y, NY, s_scale, t_scale, D, DT,
                 stride_sq, stride_sk, stride_tq, stride_tk, BLOCK_X: tl.constexpr,
                 BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                 INPUT_PRECISION: tl.constexpr):
    """(student, teacher) score tiles (BLOCK_X, BLOCK_Y) fp32 of the rows offs_x against the
    inner rows offs_y, and the inner rows' in-range mask."""
    mask_y = offs_y < NY
    s = _dot_rows(SQ, SK, offs_x, offs_y, mask_x, mask_y, stride_sq, stride_sk, D, BLOCK_X,
                  BLOCK_Y, BLOCK_D, UPCAST, INPUT_PRECISION) * s_scale
    t = _dot_rows(TQ, TK, offs_x, offs_y, mask_x, mask_y, stride_tq, stride_tk, DT, BLOCK_X,
                  BLOCK_Y, BLOCK_D, UPCAST, INPUT_PRECISION) * t_scale
    return s, t, mask_y


@triton.jit
def _distill_fwd_kernel(
    SQ, SK, TQ, TK, Scales,     # features row-major; Scales (2,) fp32 = (s_scale, t_scale)
    Stats,                      # out: (3, N) fp32 = lse^S, lse^T, w
    N, M, D, DT, stride_sq, stride_sk, stride_tq, stride_tk,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    offs_n, mask_n = _block_rows(tl.program_id(0).to(tl.int64), BLOCK_N, N)
    s_scale, t_scale = _scales(Scales)
    max_s = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    max_t = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    sum_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    weighted = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum_j e^{t_ij - max_t} s_ij
    arange_m = tl.arange(0, BLOCK_M).to(tl.int64)
    for mb in range(0, tl.cdiv(M, BLOCK_M)):
        s, t, mask_m = _tile_scores(SQ, SK, TQ, TK, offs_n, mask_n, mb * BLOCK_M + arange_m, M,
                                    s_scale, t_scale, D, DT, stride_sq, stride_sk, stride_tq,
                                    stride_tk, BLOCK_N, BLOCK_M, BLOCK_D, UPCAST, INPUT_PRECISION)
        s_in = tl.where(mask_m[None, :], s, 0.0)
        s = tl.where(mask_m[None, :], s, float("-inf"))
        t = tl.where(mask_m[None, :], t, float("-inf"))
        new_s = tl.maximum(max_s, tl.max(s, axis=1))  # finite: every tile has a valid column
        new_t = tl.maximum(max_t, tl.max(t, axis=1))
        sum_s = sum_s * tl.exp(max_s - new_s) + tl.sum(tl.exp(s - new_s[:, None]), axis=1)
        rescale = tl.exp(max_t - new_t)
        e_t = tl.exp(t - new_t[:, None])
        sum_t = sum_t * rescale + tl.sum(e_t, axis=1)
        weighted = weighted * rescale + tl.sum(e_t * s_in, axis=1)
        max_s = new_s
        max_t = new_t
    tl.store(Stats + offs_n, max_s + tl.log(sum_s), mask=mask_n)
    tl.store(Stats + N + offs_n, max_t + tl.log(sum_t), mask=mask_n)
    tl.store(Stats + 2 * N + offs_n, weighted / sum_t, mask=mask_n)


@triton.jit
def _softmax_gap(s, t, lse_s, lse_t, a, g):
    """a e^{s - lse_s} - g e^{t - lse_t}: the student's probability weighted by a minus the
    teacher's weighted by g."""
    return a * tl.exp(s - lse_s) - g * tl.exp(t - lse_t)


@triton.jit
def _distill_bwd_kernel(
    XQ, XK, TXQ, TXK, Scales,   # outer (NX, D) / inner (NY, D) student rows, teacher rows (DT)
    OuterStats, OuterGrad, OuterStudentGrad,  # (3, NX), (NX,), (NX,) fp32: this direction's
                                # lse's, teacher weights g and student weights a
    InnerStats, InnerGrad, InnerStudentGrad,  # the other direction's (if HAS_INNER)
    InvGradScale,               # (1,) fp32 1 / G_max
    GOut,                       # out: (NX, D) fp32 = G_max^-1 sum_y G_xy XK_y
    NX, NY, D, DT, stride_xq, stride_xk, stride_tq, stride_tk, stride_g,
    BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_OUTER: tl.constexpr, HAS_INNER: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    offs_x, mask_x = _block_rows(tl.program_id(0).to(tl.int64), BLOCK_X, NX)
    offs_d = tl.arange(0, BLOCK_D)
    s_scale, t_scale = _scales(Scales)
    inv_gs = tl.load(InvGradScale)
    if HAS_OUTER:
        g_x = tl.load(OuterGrad + offs_x, mask=mask_x, other=0.0)
        a_x = tl.load(OuterStudentGrad + offs_x, mask=mask_x, other=0.0)
        lse_s_x = tl.load(OuterStats + offs_x, mask=mask_x, other=0.0)
        lse_t_x = tl.load(OuterStats + NX + offs_x, mask=mask_x, other=0.0)
    arange_y = tl.arange(0, BLOCK_Y).to(tl.int64)
    for yb in range(0, tl.cdiv(NY, BLOCK_Y)):
        offs_y = yb * BLOCK_Y + arange_y
        s, t, mask_y = _tile_scores(XQ, XK, TXQ, TXK, offs_x, mask_x, offs_y, NY, s_scale,
                                    t_scale, D, DT, stride_xq, stride_xk, stride_tq, stride_tk,
                                    BLOCK_X, BLOCK_Y, BLOCK_D, UPCAST, INPUT_PRECISION)
        grad = tl.zeros((BLOCK_X, BLOCK_Y), dtype=tl.float32)
        if HAS_OUTER:
            grad += _softmax_gap(s, t, lse_s_x[:, None], lse_t_x[:, None], a_x[:, None],
                                 g_x[:, None])
        if HAS_INNER:
            c_y = tl.load(InnerGrad + offs_y, mask=mask_y, other=0.0)
            ca_y = tl.load(InnerStudentGrad + offs_y, mask=mask_y, other=0.0)
            lse_s_y = tl.load(InnerStats + offs_y, mask=mask_y, other=0.0)
            lse_t_y = tl.load(InnerStats + NY + offs_y, mask=mask_y, other=0.0)
            grad += _softmax_gap(s, t, lse_s_y[None, :], lse_t_y[None, :], ca_y[None, :],
                                 c_y[None, :])
        grad = tl.where(mask_x[:, None] & mask_y[None, :], grad, 0.0) * inv_gs
        if not UPCAST:
            grad = grad.to(XK.dtype.element_ty)  # fp16/bf16 tensor-core operand
        # This program's own rows of GOut (fp32) hold the running sum, D chunk by D chunk. The
        # barrier orders the previous iteration's stores before these loads.
        tl.debug_barrier()
        for d0 in range(0, D, BLOCK_D):
            part = tl.dot(grad, _load_rows(XK, offs_y, mask_y, stride_xk, d0, D, BLOCK_D, UPCAST),
                          input_precision=INPUT_PRECISION)
            cols = d0 + offs_d
            ptrs = GOut + offs_x[:, None] * stride_g + cols[None, :]
            inside = mask_x[:, None] & (cols[None, :] < D)
            if yb > 0:
                part += tl.load(ptrs, mask=inside, other=0.0)
            tl.store(ptrs, part, mask=inside)


# ---------------------------------------------------------------------------------------------
# Host functions
# ---------------------------------------------------------------------------------------------

# Launch configurations (see _common._block_config); not tuned on a GPU yet. The D chunk serves
# the student's and the teacher's dims alike.
_GPU_TENSOR_CORE = dict(block_x=64, block_y=64, max_block_d=64, chunk_d=64, num_warps=4,
                        num_stages=2)
_GPU_IEEE = dict(block_x=32, block_y=64, max_block_d=32, chunk_d=32, num_warps=4, num_stages=2)
_INTERPRETER = dict(block_x=64, block_y=64, max_block_d=64, chunk_d=64, num_warps=4,
                    num_stages=1)


def _check_inputs(sq, sk, tq, tk, s_scale, t_scale):
    """Validate the operands; return (N, M, D, DT) and the (2,) fp32 (s_scale, t_scale)."""
    for name, t in (("sq", sq), ("sk", sk), ("tq", tq), ("tk", tk)):
        _check_matrix(name, t)
        if t.dtype != sq.dtype or t.device != sq.device:
            raise TypeError(f"{name} must have the dtype and device of sq ({sq.dtype}, "
                            f"{sq.device}), got {t.dtype}, {t.device}")
    if sk.shape[1] != sq.shape[1] or tk.shape[1] != tq.shape[1]:
        raise ValueError(f"sk must have the D of sq and tk the D of tq, got shapes "
                         f"{tuple(sq.shape)}, {tuple(sk.shape)}, {tuple(tq.shape)}, "
                         f"{tuple(tk.shape)}")
    if tq.shape[0] != sq.shape[0] or tk.shape[0] != sk.shape[0]:
        raise ValueError(f"tq must have the rows of sq and tk those of sk, got shapes "
                         f"{tuple(sq.shape)}, {tuple(sk.shape)}, {tuple(tq.shape)}, "
                         f"{tuple(tk.shape)}")
    _check_device("sq", sq.device)
    for name, value in (("s_scale", s_scale), ("t_scale", t_scale)):
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            raise TypeError(f"{name} must be a 0-dim tensor, got {value!r}")
    scales = torch.stack([s_scale.detach(), t_scale.detach()]).to(device=sq.device,
                                                                  dtype=torch.float32)
    return sq.shape[0], sk.shape[0], sq.shape[1], tq.shape[1], scales


def _launch_options(sq, dims, blocks):
    """(block_x, block_y, the launch options shared by the kernels)."""
    precision = _input_precision(sq.dtype)
    bx, by, bd, _, warps, stages = _block_config(max(dims), precision, blocks,
                                                 tensor_core=_GPU_TENSOR_CORE, ieee=_GPU_IEEE,
                                                 interpreter=_INTERPRETER)
    return bx, by, dict(BLOCK_D=bd, UPCAST=_upcast(sq.dtype), INPUT_PRECISION=precision,
                        num_warps=warps, num_stages=stages)


def _row_stats(sq, sk, tq, tk, scales, options, bx, by):
    n, m = sq.shape[0], sk.shape[0]
    stats = new_output((3, n), torch.float32, sq.device)
    _distill_fwd_kernel[(triton.cdiv(n, bx),)](
        sq, sk, tq, tk, scales, stats, n, m, sq.shape[1], tq.shape[1], sq.stride(0),
        sk.stride(0), tq.stride(0), tk.stride(0), BLOCK_N=bx, BLOCK_M=by, **options)
    return stats


def distill_forward(sq, sk, tq, tk, s_scale, t_scale, *, with_cols=False, blocks=None):
    """(row stats (3, N) fp32, col stats (3, M) fp32 or None): lse^S, lse^T, w (module
    docstring). sq (N, D), sk (M, D), tq (N, DT), tk (M, DT): one dtype of SUPPORTED_DTYPES,
    rows contiguous; scales 0-dim tensors. ``blocks`` overrides (rows, keys, D chunk)."""
    n, m, d, dt, scales = _check_inputs(sq, sk, tq, tk, s_scale, t_scale)
    bx, by, options = _launch_options(sq, (d, dt), blocks)
    with _device_context(sq):
        rows = _row_stats(sq, sk, tq, tk, scales, options, bx, by)
        cols = _row_stats(sk, sq, tk, tq, scales, options, bx, by) if with_cols else None
    return rows, cols


def _weights(stats, grad, student_grad):
    """(stats, teacher weights, student weights) fp32 contiguous; student: grad if None."""
    out = [t.float().contiguous() for t in (stats, grad)]
    return [*out, out[1] if student_grad is None else student_grad.float().contiguous()]


def _largest(weights):
    """max over the teacher's and the student's weights of |weight|."""
    return torch.maximum(weights[1].abs().amax(), weights[2].abs().amax())


def distill_backward(sq, sk, tq, tk, s_scale, t_scale, row_stats, row_grad, col_stats=None,
                     col_grad=None, *, need_gq=True, need_gk=True, blocks=None,
                     row_student_grad=None, col_student_grad=None):
    """(gq (N, D) fp32 or None, gk (M, D) fp32 or None) for G of the module docstring,
    recomputing the tiles; row_grad (N,) / col_grad (M,) fp32 (col_* None: rows only); the
    student weights row_student_grad / col_student_grad (None: row_grad / col_grad)."""
    _, _, d, dt, scales = _check_inputs(sq, sk, tq, tk, s_scale, t_scale)
    has_cols = col_stats is not None
    stats = _weights(row_stats, row_grad, row_student_grad)
    cols = _weights(col_stats, col_grad, col_student_grad) if has_cols else stats
    magnitude = _largest(stats) + (_largest(cols) if has_cols else 0.0)
    gs = _grad_scale(magnitude)
    inv_gs = gs.reciprocal()
    bx, by, options = _launch_options(sq, (d, dt), blocks)

    def gradient(xq, xk, txq, txk, outer, inner, has_outer, has_inner):
        """G xk for the rows of xq (gk: the transposed problem); the kernel sums G / G_max."""
        nx, ny = xq.shape[0], xk.shape[0]
        out = new_output((nx, d), torch.float32, sq.device)
        _distill_bwd_kernel[(triton.cdiv(nx, bx),)](
            xq, xk, txq, txk, scales, *outer, *inner, inv_gs, out, nx, ny, d, dt, xq.stride(0),
            xk.stride(0), txq.stride(0), txk.stride(0), out.stride(0), BLOCK_X=bx, BLOCK_Y=by,
            HAS_OUTER=has_outer, HAS_INNER=has_inner, **options)
        return out.mul_(gs)

    with _device_context(sq):
        gq = gradient(sq, sk, tq, tk, stats, cols, True, has_cols) if need_gq else None
        gk = gradient(sk, sq, tk, tq, cols, stats, has_cols, True) if need_gk else None
    return gq, gk
