"""Masked log-sum-exp over similarity tiles, and its gradient: the host functions of the Triton
core of InfoNCE losses (the @triton.jit kernels are in kernels/_masked_lse_kernels.py).

Every fused loss of fastcontrast (info_nce, clip_loss, nt_xent, supcon, moco_loss) reduces to scores

    s_ij = alpha_i * beta_j * <q_i, keys_j>          (alpha = 1/temperature, beta = 1 usually)

over candidate pairs, of which it needs only the per-row (and, when symmetric, per-column)
log-sum-exp in the forward pass and the tile gradient dS in the backward pass. The (N, M) score
matrix is never stored: the forward pass streams key tiles past a block of rows with an online
max/sum, and the backward pass recomputes each tile (FlashAttention-2 style).

    masked_lse_forward  -> row_lse_i = logsumexp_j s_ij  (and col_lse_j = logsumexp_i s_ij)
    masked_lse_backward -> dq_i = alpha_i sum_j dS_ij beta_j keys_j,
                           dkeys_j = beta_j sum_i dS_ij alpha_i q_i,
                           dS_ij = row_grad_i exp(s_ij - row_lse_i)
                                   + col_grad_j exp(s_ij - col_lse_j)  (col_lse given),
                           0 where masked

This module validates the arguments, chooses the launch configuration and launches: the forward
kernel once, the backward kernel once per operand whose gradient is needed (X = q for dq,
X = keys for dkeys, the tile seen transposed).

Launch configurations: one per case by default (and always in the interpreter). On a GPU,
FASTCONTRAST_TRITON_AUTOTUNE=1 (read at each call) makes the backward with D above the one-chunk
limit (128 on tensor cores, 32 for fp32 'ieee') autotune over the small set _SPLIT_TENSOR_CORE
(triton.autotune, keyed on N, M, D, dtype and the mask flags; the first call per key then times
every config), and FASTCONTRAST_TRITON_CONFIG=i pins config i of that set (for benchmarking).
The tile loads and dot products, the block-config rule, the device check and the output
allocation are shared with the SigLIP kernels (kernels/_common.py).

Numerics: scores are kept in log2 units (log2(e) folded into the row scale) so the kernels use
exp2/log2; all accumulation is fp32 whatever the input dtype; tile products run on input-dtype
tiles (fp16/bf16 tensor cores on GPU; fp32 inputs follow torch's float32 matmul precision setting).
A row or column without any candidate gets an lse of -inf and contributes nothing (never NaN).
Non-finite scores give what torch.logsumexp gives: NaN with a NaN candidate, +inf with a +inf one
(the exp shift is 0 where the running max is infinite); a masked entry's gradient is 0 whatever
the lse (NaN) and the upstream gradients.
"""
import math

import torch
import triton

from .._validation import check_ids
from .._config import settings
from ._common import SUPPORTED_DTYPES  # noqa: F401 (the dtypes these kernels take)
from ._common import (_INTERPRET, _block_config, _check_device, _check_matrix, _device_context,
                      _grad_scale, _input_precision, _upcast, new_output)
# The launches below name the kernels through this module's globals (the compile checks replace
# them here with recorders).
from ._masked_lse_kernels import _masked_lse_bwd_kernel, _masked_lse_fwd_kernel

# The host passes L2-normalised q/keys with alpha = 1/temperature and beta = 1 where it can: tile
# values are then O(1) and fp16/bf16 tiles lose nothing. General alpha/beta are honoured.

# Launch configurations: rows of the outer operand per program (block_x), rows of the inner
# operand per tile (block_y), the largest D run as one chunk (the outer tile, and in backward the
# gradient accumulator, then stay on chip), the chunk size for larger D, num_warps, num_stages;
# for the backward with D in chunks, the width of each program's dX columns (split_d, below).
# The GPU values compile for sm_90 without register spills (tests/kernels/test_triton_compile.py)
# but are not yet tuned on a GPU.
# Tensor-core tiles (fp16/bf16, fp32 as tf32): FlashAttention-like 128 x 64 tiles, 8 warps.
_GPU_TENSOR_CORE = {
    "fwd": dict(block_x=128, block_y=64, max_block_d=128, chunk_d=64, num_warps=8, num_stages=3),
    # block_y 32: with 64 the id-masked variants need more than 255 registers and spill.
    "bwd": dict(block_x=128, block_y=32, max_block_d=128, chunk_d=64, num_warps=8, num_stages=2),
}
# Full-precision fp32 ("ieee"): tl.dot runs on the FMA units with operands in registers, so
# smaller tiles and chunks (larger ones spill).
# block_y 32: with 64 the forward and the id-masked backward variants spill. Forward num_stages 1:
# with 2, Triton 3.6's ptxas (the GPU image's) spills 8 bytes in two variants, 1 spills nowhere
# on 3.6 or 3.9 (not timed on a GPU; 8 warps of FMA work still hide the load latency).
_GPU_IEEE = {
    "fwd": dict(block_x=64, block_y=32, max_block_d=32, chunk_d=32, num_warps=8, num_stages=1),
    "bwd": dict(block_x=64, block_y=32, max_block_d=32, chunk_d=32, num_warps=8, num_stages=2),
}
# The interpreter runs each tile op once in numpy: few, large tiles are fastest.
_INTERPRETER = dict(block_x=64, block_y=64, max_block_d=128, chunk_d=128, num_warps=4, num_stages=1)

# Backward with D above max_block_d (D in chunks): (block_x, block_y, chunk_d, split_d, num_warps,
# num_stages). Each program keeps a block_x x split_d fp32 dX accumulator in registers; the
# scores are recomputed once per split (see the model in _masked_lse_bwd_kernel). Why this
# layout: the accumulator is what must stay on chip, and 8 warps hold at most ~32K fp32 of it
# (block_x * split_d, 128 registers a thread) beside the score tile. Keeping all of D resident
# (the one-chunk path with block_x 64 at D = 512) spills in every variant (ptxas, sm_90); a
# FlashAttention-2 dq/dk layout needs atomics on dq, a read-modify-write per key block again.
# Model at N = M = 65536, D = 512, bf16 (per kernel; 4 N M D = 8.8 TFLOP is the minimum):
#   dX accumulated in place:         4 N M D,  ~380 GB (275 GB of them fp32 dX read + written)
#   split_d 512 (S = 1), 64 x 32:    4 N M D,  ~275 GB of bf16 re-reads (L2), nothing written
#   split_d 256 (S = 2), 64 x 64:    6 N M D,  ~344 GB
#   split_d 128 (S = 4), 128 x 64:  10 N M D,  ~447 GB
# so the default is split_d 512 (no recomputation up to D = 512; S = 2 at D = 768, 1024); the
# other two are there for the autotuner, since which of L2 bandwidth and the tensor cores binds
# is for a GPU run to show (not measured yet). The first entry is the default; with
# FASTCONTRAST_TRITON_AUTOTUNE=1 on a GPU, triton.autotune picks among all of them per
# (NX, NY, D, dtype, flags); FASTCONTRAST_TRITON_CONFIG=i pins entry i.
_SPLIT_TENSOR_CORE = (
    dict(block_x=64, block_y=32, chunk_d=64, split_d=512, num_warps=8, num_stages=2),
    dict(block_x=64, block_y=64, chunk_d=64, split_d=256, num_warps=8, num_stages=2),
    dict(block_x=128, block_y=64, chunk_d=64, split_d=128, num_warps=8, num_stages=2),
)
_SPLIT_IEEE = (dict(block_x=64, block_y=32, chunk_d=32, split_d=256, num_warps=8, num_stages=2),)
AUTOTUNE_ENV = "FASTCONTRAST_TRITON_AUTOTUNE"
CONFIG_ENV = "FASTCONTRAST_TRITON_CONFIG"


def _config(which, D, precision, blocks):
    """(block_x, block_y, block_d, one_d_chunk, num_warps, num_stages) of the `which` ("fwd" or
    "bwd") launch: _common._block_config over the configs above."""
    return _block_config(D, precision, blocks, tensor_core=_GPU_TENSOR_CORE[which],
                         ieee=_GPU_IEEE[which], interpreter=_INTERPRETER)


def _split_candidates(precision):
    """The backward configs for D in chunks (the interpreter: its single config, split_d =
    chunk_d)."""
    if _INTERPRET:
        c = _INTERPRETER
        return (dict(block_x=c["block_x"], block_y=c["block_y"], chunk_d=c["chunk_d"],
                     split_d=c["chunk_d"], num_warps=c["num_warps"], num_stages=c["num_stages"]),)
    return _SPLIT_IEEE if precision == "ieee" else _SPLIT_TENSOR_CORE


def _bwd_launches(D, precision, blocks):
    """The candidate launches of the backward: [(constexpr dict, num_warps, num_stages)], one
    unless autotuning; the first is the one run without autotuning."""
    bx, by, bd, one, warps, stages = _config("bwd", D, precision, blocks)
    if one or blocks is not None:  # one chunk, or sizes given: one split per chunk
        return [(dict(BLOCK_X=bx, BLOCK_Y=by, BLOCK_D=bd, SPLIT_D=bd, ONE_D_CHUNK=one), warps,
                 stages)]
    configs = [(dict(BLOCK_X=c["block_x"], BLOCK_Y=c["block_y"], BLOCK_D=c["chunk_d"],
                     SPLIT_D=min(c["split_d"], max(16, triton.next_power_of_2(D))),
                     ONE_D_CHUNK=False), c["num_warps"], c["num_stages"])
               for c in _split_candidates(precision)]
    pinned = settings().triton_config
    if pinned is not None:
        if pinned >= len(configs):
            raise ValueError(f"{CONFIG_ENV} must be an index below {len(configs)}, got {pinned}")
        return [configs[pinned]]
    if settings().triton_autotune and not _INTERPRET:
        return configs
    return configs[:1]


_AUTOTUNED = {}


def _launch_bwd(grid_rows, D, launches, args, flags):
    """Launch _masked_lse_bwd_kernel over grid (cdiv(grid_rows, BLOCK_X), cdiv(D, SPLIT_D)): with
    the single launch given, or autotuned over several (kernel outputs are written, never
    accumulated, so the autotuner's repeated runs are harmless)."""
    if len(launches) == 1:
        meta, warps, stages = launches[0]
        grid = (triton.cdiv(grid_rows, meta["BLOCK_X"]), triton.cdiv(D, meta["SPLIT_D"]))
        _masked_lse_bwd_kernel[grid](*args, **meta, **flags, num_warps=warps, num_stages=stages)
        return
    key = tuple((tuple(sorted(m.items())), w, st) for m, w, st in launches)
    if key not in _AUTOTUNED:
        configs = [triton.Config(m, num_warps=w, num_stages=st) for m, w, st in launches]
        _AUTOTUNED[key] = triton.autotune(
            configs=configs, key=["NX", "NY", "D", "EXCLUDE_DIAG", "HAS_IDS", "HAS_LSE_X",
                                  "HAS_LSE_Y"])(_masked_lse_bwd_kernel)
    grid = lambda meta: (triton.cdiv(grid_rows, meta["BLOCK_X"]),  # noqa: E731
                         triton.cdiv(D, meta["SPLIT_D"]))
    _AUTOTUNED[key][grid](*args, **flags)


def _check_vector(name, t, length, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {t.dtype}")
    if t.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} (the device of q), got {t.device}")
    if length > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {t.stride()}")


def _check_operands(q, keys, alpha, beta):
    """Validate q/keys/alpha/beta; return (N, M, D)."""
    _check_matrix("q", q)
    _check_matrix("keys", keys)
    if keys.dtype != q.dtype:
        raise TypeError(f"keys must have the dtype of q ({q.dtype}), got {keys.dtype}")
    if keys.shape[1] != q.shape[1]:
        raise ValueError(f"keys must have D = {q.shape[1]} columns like q, got shape "
                         f"{tuple(keys.shape)}")
    if keys.device != q.device:
        raise ValueError(f"keys must be on {q.device} (the device of q), got {keys.device}")
    _check_device("q", q.device)
    N, D = q.shape
    M = keys.shape[0]
    _check_vector("alpha", alpha, N, q.device)
    _check_vector("beta", beta, M, q.device)
    return N, M, D


def _check_ids(row_ids, col_ids, N, M, device):
    """True when both id vectors are given (validated: int64 (N,) / (M,) on device)."""
    if (row_ids is None) != (col_ids is None):
        raise ValueError("row_ids and col_ids must be given together (both or neither), got "
                         f"row_ids={'None' if row_ids is None else 'tensor'}, "
                         f"col_ids={'None' if col_ids is None else 'tensor'}")
    if row_ids is None:
        return False
    check_ids("row_ids", row_ids, N, device)
    check_ids("col_ids", col_ids, M, device)
    if row_ids.stride(0) != 1 or col_ids.stride(0) != 1:
        raise ValueError("row_ids and col_ids must be contiguous")
    return True


def _column_rule_args(q, alpha, keys_n, threshold, guide_q, col_threshold, col_positive_row,
                      col_guide_threshold):
    """(pointer arguments (CThr, CPos, CGThr), constexpr flags) of the filter's column rule
    (fastcontrast/infonce/ops.py; alpha, never read, and no flag without one)."""
    if col_positive_row is None:
        return (alpha,) * 3, {}
    check_ids("col_positive_row", col_positive_row, keys_n, q.device)
    for name, t, given in (("col_threshold", col_threshold, threshold is not None),
                           ("col_guide_threshold", col_guide_threshold, guide_q is not None)):
        if (t is not None) != given:
            raise ValueError(f"{name} must be given exactly with the row rule's, got "
                             f"{'a tensor' if t is not None else 'None'}")
        if t is not None:
            _check_vector(name, t, keys_n, q.device)
    return ((alpha if col_threshold is None else col_threshold, col_positive_row,
             alpha if col_guide_threshold is None else col_guide_threshold),
            dict(COL_RULE=True))


def _filter_args(q, alpha, keys_n, threshold=None, positive_col=None, guide_q=None,
                 guide_keys=None, guide_threshold=None, col_threshold=None, col_positive_row=None,
                 col_guide_threshold=None):
    """(pointer arguments, column rule pointers, constexpr flags) of the false-negative filter
    (no flags without one: the kernels' defaults, FILTER False, so a plain launch is the plain
    kernel's; every pointer is then alpha, never read)."""
    if threshold is None and guide_q is None:
        return (alpha,) * 5 + (0, 0, 0), (alpha,) * 3, {}
    N = q.shape[0]
    if threshold is not None:
        _check_vector("threshold", threshold, N, q.device)
    if positive_col is not None:
        check_ids("positive_col", positive_col, N, q.device)
    G = 0
    if guide_q is not None:
        for name, t, rows in (("guide_q", guide_q, N), ("guide_keys", guide_keys, keys_n)):
            if t.dtype != q.dtype or t.shape[0] != rows or t.stride(-1) != 1:
                raise ValueError(f"{name} must be ({rows}, G) in {q.dtype} with contiguous rows, "
                                 f"got {tuple(t.shape)} {t.dtype}")
        _check_vector("guide_threshold", guide_threshold, N, q.device)
        G = guide_q.shape[1]
    pointers = (alpha if threshold is None else threshold,
                alpha if positive_col is None else positive_col,
                alpha if guide_q is None else guide_q, alpha if guide_q is None else guide_keys,
                alpha if guide_q is None else guide_threshold,
                0 if guide_q is None else guide_q.stride(0),
                0 if guide_q is None else guide_keys.stride(0), G)
    col_pointers, col_flags = _column_rule_args(q, alpha, keys_n, threshold, guide_q,
                                                col_threshold, col_positive_row,
                                                col_guide_threshold)
    flags = dict(FILTER=True, HAS_THRESHOLD=threshold is not None, HAS_GUIDE=guide_q is not None,
                 HAS_POS=positive_col is not None,
                 BLOCK_G=min(64, max(16, triton.next_power_of_2(max(G, 1)))), **col_flags)
    return pointers, col_pointers, flags


def masked_lse_forward(q, keys, alpha, beta, *, exclude_diag=False, diag_offset=0, row_ids=None,
                       col_ids=None, with_col_lse=False, blocks=None, dropped=None,
                       col_dropped=None, **lse_filter):
    """Row (and optionally column) log-sum-exp of s_ij = alpha_i * beta_j * <q_i, keys_j>.

    q: (N, D), keys: (M, D), same dtype (float16, bfloat16, float32) and device, rows contiguous.
    alpha: (N,) float32, beta: (M,) float32. Entry (i, j) is masked iff exclude_diag and
    j == i + diag_offset, or row_ids[i] == col_ids[j] >= 0 (int64 (N,), (M,), both or neither).
    Returns (row_lse (N,) float32, col_lse (M,) float32 or None); a row or
    column without candidates gets -inf. `blocks` optionally overrides (block_rows, block_keys,
    block_d). ``lse_filter``: the false-negative filter's keywords (threshold, positive_col,
    guide_q, guide_keys, guide_threshold and the column rule's; fastcontrast/infonce/ops.py),
    ``dropped``: an (N,) int32 tensor that receives the dropped counts (``col_dropped``: (M,)
    int32 zeros that receive the column rule's). The column lse is merged across programs in
    scheduling order, so its last bits may vary from run to run on GPU; row_lse is
    deterministic."""
    N, M, D = _check_operands(q, keys, alpha, beta)
    dev = q.device
    has_ids = _check_ids(row_ids, col_ids, N, M, dev)
    row_lse = new_output(N, torch.float32, dev)
    col_lse = None
    if N == 0 or M == 0:
        row_lse.fill_(float("-inf"))
        if with_col_lse:
            col_lse = torch.full((M,), float("-inf"), dtype=torch.float32, device=dev)
        return row_lse, col_lse

    precision = _input_precision(q.dtype)
    block_n, block_m, block_d, one_chunk, warps, stages = _config("fwd", D, precision, blocks)
    if with_col_lse:
        col_max = torch.full((M,), float("-inf"), dtype=torch.float32, device=dev)
        col_sum = torch.zeros(M, dtype=torch.float32, device=dev)
        lock = torch.zeros(triton.cdiv(M, block_m), dtype=torch.int32, device=dev)
    else:  # never dereferenced when HAS_COL is False
        col_max = col_sum = lock = row_lse
    grid = (triton.cdiv(N, block_n),)
    pointers, col_pointers, filter_flags = _filter_args(q, alpha, M, **lse_filter)
    with _device_context(q):
        _masked_lse_fwd_kernel[grid](
            q, keys, alpha, beta, row_ids if has_ids else alpha, col_ids if has_ids else beta,
            row_lse, col_max, col_sum, lock,
            N, M, D, q.stride(0), keys.stride(0), int(diag_offset),
            *pointers[:5], row_lse if dropped is None else dropped, *pointers[5:],
            *col_pointers, row_lse if col_dropped is None else col_dropped,
            **filter_flags, **({} if dropped is None else dict(COUNT=True)),
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_D=block_d, EXCLUDE_DIAG=bool(exclude_diag),
            HAS_IDS=has_ids, HAS_COL=bool(with_col_lse), ONE_D_CHUNK=one_chunk,
            UPCAST=_upcast(q.dtype), INPUT_PRECISION=precision,
            num_warps=warps, num_stages=stages,
        )
    if with_col_lse:
        # col_lse = ln2 * (max + log2(sum)); no candidate: -inf + log2(0) = -inf.
        col_lse = col_sum.log2_().add_(col_max).mul_(math.log(2.0))
    return row_lse, col_lse


def masked_lse_backward(q, keys, alpha, beta, row_lse, row_grad, col_lse=None, col_grad=None, *,
                        exclude_diag=False, diag_offset=0, row_ids=None, col_ids=None, need_dq=True,
                        need_dkeys=True, blocks=None, **lse_filter):
    """Gradient of sum_i row_grad_i * row_lse_i (+ sum_j col_grad_j * col_lse_j) w.r.t. q and keys.

    dS_ij = row_grad_i * exp(s_ij - row_lse_i) + col_grad_j * exp(s_ij - col_lse_j) (second term
    only when col_lse is given), 0 where masked (as in masked_lse_forward); an lse of -inf
    contributes 0.
    dq_i = alpha_i * sum_j dS_ij beta_j keys_j;  dkeys_j = beta_j * sum_i dS_ij alpha_i q_i.
    row_lse/col_lse may be larger than this pair's own lse (global lse over more candidates).
    Returns (dq (N, D) float32 or None, dkeys (M, D) float32 or None); deterministic."""
    N, M, D = _check_operands(q, keys, alpha, beta)
    dev = q.device
    _check_vector("row_lse", row_lse, N, dev)
    _check_vector("row_grad", row_grad, N, dev)
    has_ids = _check_ids(row_ids, col_ids, N, M, dev)
    if (col_lse is None) != (col_grad is None):
        raise ValueError("col_lse and col_grad must be given together (both or neither), got "
                         f"col_lse={'None' if col_lse is None else 'tensor'}, "
                         f"col_grad={'None' if col_grad is None else 'tensor'}")
    has_col = col_lse is not None
    if has_col:
        _check_vector("col_lse", col_lse, M, dev)
        _check_vector("col_grad", col_grad, M, dev)

    dq = new_output((N, D), torch.float32, dev) if need_dq else None
    dkeys = new_output((M, D), torch.float32, dev) if need_dkeys else None
    if N == 0 or M == 0 or D == 0:
        for t in (dq, dkeys):
            if t is not None:
                t.zero_()
        return dq, dkeys

    gmax = row_grad.abs().amax()
    if has_col:
        gmax = torch.maximum(gmax, col_grad.abs().amax())
    precision = _input_precision(q.dtype)
    launches = _bwd_launches(D, precision, blocks)
    flags = dict(EXCLUDE_DIAG=bool(exclude_diag), HAS_IDS=has_ids, UPCAST=_upcast(q.dtype),
                 INPUT_PRECISION=precision)
    # Unused pointer arguments (HAS_LSE_* False) point at a tensor that exists; never read.
    col_lse_arg = col_lse if has_col else row_lse
    col_grad_arg = col_grad if has_col else row_grad
    row_ids_arg, col_ids_arg = (row_ids, col_ids) if has_ids else (alpha, beta)
    pointers, col_pointers, filter_flags = _filter_args(q, alpha, M, **lse_filter)
    pointers = (*pointers, *col_pointers)
    with _device_context(q):
        if need_dq:  # outer = q (row terms), inner = keys (column terms)
            _launch_bwd(N, D, launches, (
                q, keys, dq, alpha, beta, row_ids_arg, col_ids_arg, row_lse, row_grad, col_lse_arg,
                col_grad_arg, _grad_scale(gmax * beta.abs().amax()),
                N, M, D, q.stride(0), keys.stride(0), dq.stride(0), int(diag_offset), *pointers,
            ), dict(HAS_LSE_X=True, HAS_LSE_Y=has_col, **flags, **filter_flags))
        if need_dkeys:  # outer = keys (column terms), inner = q (row terms); mask i == j - offset
            _launch_bwd(M, D, launches, (
                keys, q, dkeys, beta, alpha, col_ids_arg, row_ids_arg, col_lse_arg, col_grad_arg,
                row_lse, row_grad, _grad_scale(gmax * alpha.abs().amax()),
                M, N, D, keys.stride(0), q.stride(0), dkeys.stride(0), -int(diag_offset), *pointers,
            ), dict(HAS_LSE_X=has_col, HAS_LSE_Y=True, **flags, **filter_flags,
                    **(dict(FILTER_ON_X=False) if filter_flags else {})))
    return dq, dkeys


def masked_lse_dropped(q, keys, alpha, beta, *, exclude_diag=False, diag_offset=0, row_ids=None,
                       col_ids=None, blocks=None, **lse_filter):
    """int64 (N,): the candidates of each row that the false-negative filter drops (the forward
    kernel with COUNT; its lse is discarded); with the column rule (N + M,), then each key's."""
    dropped = torch.zeros(q.shape[0], dtype=torch.int32, device=q.device)
    col_dropped = None
    if lse_filter.get("col_positive_row") is not None:
        col_dropped = torch.zeros(keys.shape[0], dtype=torch.int32, device=q.device)
    masked_lse_forward(q, keys, alpha, beta, exclude_diag=exclude_diag, diag_offset=diag_offset,
                       row_ids=row_ids, col_ids=col_ids, blocks=blocks, dropped=dropped,
                       col_dropped=col_dropped, **lse_filter)
    return dropped.long() if col_dropped is None else torch.cat([dropped, col_dropped]).long()
