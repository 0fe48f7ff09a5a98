"""@triton.jit pieces of the masked log-sum-exp kernels, shared by the full product
(kernels/_masked_lse_kernels.py) and the symmetric Gram forward (kernels/gram.py).

Scores are kept in log2 units: with the row scale multiplied by log2(e),

    s_ij = log2(e) * alpha_i * beta_j * <x_i, y_j>,   lse_i = ln(2) * (m_i + log2(l_i)),

where a row's running (max m_i, sum l_i = sum_j exp2(s_ij - m_i)) is updated one tile of
candidates at a time (``online_row_lse``); the same statistics per column are merged across
programs under a per-block lock (``merge_column_stats``). Entry (i, j) is a candidate unless it
lies outside the matrix, on the shifted diagonal j == i + diag_offset (EXCLUDE_DIAG), or has
equal ids >= 0 (HAS_IDS); non-candidates score -inf. Non-finite scores give what
torch.logsumexp gives (``finite_or_zero``).
"""
import triton
import triton.language as tl

# Global constexprs, usable inside the kernels.
LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(s) = exp2(s * log2(e))
LN2 = tl.constexpr(0.6931471805599453)  # ln(2): natural log from log2 units


@triton.jit
def unmasked(offs_r, offs_c, mask_r, mask_c, diag_offset, ids_r, ids_c,
             EXCLUDE_DIAG: tl.constexpr, HAS_IDS: tl.constexpr):
    """The entries of the tile that are candidates: inside the matrix, with EXCLUDE_DIAG not
    where column c == row r + diag_offset, with HAS_IDS not where ids_r[r] == ids_c[c] >= 0."""
    valid = mask_r[:, None] & mask_c[None, :]
    if EXCLUDE_DIAG:
        valid = valid & (offs_c[None, :] != offs_r[:, None] + diag_offset)
    if HAS_IDS:
        valid = valid & ((ids_r[:, None] != ids_c[None, :]) | (ids_r[:, None] < 0))
    return valid


@triton.jit
def scaled_masked_scores(dots, row_scale, col_scale, offs_r, offs_c, mask_r, mask_c, diag_offset,
                         ids_r, ids_c, EXCLUDE_DIAG: tl.constexpr, HAS_IDS: tl.constexpr):
    """s_ij = dots_ij * row_scale_i * col_scale_j, -inf where not ``unmasked`` (after the scales:
    a NaN or zero scale never turns a masked entry into NaN)."""
    s = dots * row_scale[:, None] * col_scale[None, :]
    valid = unmasked(offs_r, offs_c, mask_r, mask_c, diag_offset, ids_r, ids_c, EXCLUDE_DIAG,
                     HAS_IDS)
    return tl.where(valid, s, float("-inf"))


@triton.jit
def finite_or_zero(m):
    """An exp shift from a running max: 0 where it is -inf (nothing unmasked yet: -inf - (-inf)
    never appears, exp2(-inf - 0) = 0 keeps the sum at exactly 0) or +inf (an infinite score:
    exp2(inf - 0) = inf makes the sum, and so the lse, +inf, or NaN with a NaN score, as
    torch.logsumexp; a shift of +inf would give exp2(inf - inf) = NaN)."""
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def load_ids(Ids, offs, mask, HAS_IDS: tl.constexpr):
    """The int64 ids of rows offs (-1, matching nothing, outside the matrix or without ids)."""
    if HAS_IDS:
        return tl.load(Ids + offs, mask=mask, other=-1)
    return offs * 0 - 1


@triton.jit
def online_row_lse(m_i, l_i, s):
    """(m_i, l_i) updated with the scores s (log2 units) of one tile of rows i: the new running
    max, and l_i = l_i exp2(m_old - m_new) + sum_j exp2(s_ij - m_new) with a finite shift
    (``finite_or_zero``). A NaN score makes the sum NaN whether or not the max propagates it,
    and the sum stays NaN."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = finite_or_zero(m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
    return m_new, l_i


@triton.jit
def merge_column_stats(s, ColMax, ColSum, Lock, block, offs_c, mask_c):
    """Merge this tile's column (max, sum) of the scores s (log2 units) into the global per-column
    state ColMax / ColSum (fp32, initialised to -inf / 0) at columns offs_c, under the int32 spin
    lock Lock[block] (initialised to 0) of this block of columns.

    It costs a second exp2 per score: one shared tile max would underflow whole rows or columns
    when scores span > ~100. The lock follows the pattern of Triton's layer-norm backward.
    Barriers: all threads of the program must see the lock taken before reading, and must have
    issued their stores before it is released. The merged sums depend on the order in which
    programs take the lock, so their last bits may vary from run to run on GPU."""
    c_max = tl.max(s, axis=0)
    c_safe = finite_or_zero(c_max)
    c_sum = tl.sum(tl.exp2(s - c_safe[None, :]), axis=0)
    lock = Lock + block
    while tl.atomic_cas(lock, 0, 1) == 1:
        pass
    tl.debug_barrier()
    # .cg: read through L2, never a stale L1 line written by a program on another SM.
    g_max = tl.load(ColMax + offs_c, mask=mask_c, other=float("-inf"), cache_modifier=".cg")
    g_sum = tl.load(ColSum + offs_c, mask=mask_c, other=0.0, cache_modifier=".cg")
    n_max = tl.maximum(g_max, c_max)
    n_safe = finite_or_zero(n_max)
    n_sum = g_sum * tl.exp2(g_max - n_safe) + c_sum * tl.exp2(c_max - n_safe)
    tl.store(ColMax + offs_c, n_max, mask=mask_c)
    tl.store(ColSum + offs_c, n_sum, mask=mask_c)
    tl.debug_barrier()
    tl.atomic_xchg(lock, 0)
