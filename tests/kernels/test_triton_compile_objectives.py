"""The fused objectives' Triton kernel variants compile for sm_90, ptxas reports no register spills
but the known ones, and the shared memory of each launch fits one H200 program.

Recorded from the host's own launches as tests/kernels/test_triton_compile.py does (its helpers,
tests/kernels/_triton_compile_helpers.py, groups "filter" and "matryoshka"):

- the false-negative filter's variants of kernels/infonce.py's masked-LSE kernels: each row rule
  (HAS_THRESHOLD with and without HAS_POS; HAS_GUIDE; both), alone and with the column rule of a
  symmetric pass (COL_RULE), the forward with and without the dropped counts (COUNT), the
  backward for both operands (FILTER_ON_X), for bf16 and fp32 'tf32' inputs at D = 128 in one
  chunk (the plain kernels' test covers fp16, fp32 'ieee' and D in chunks);
- kernels/matryoshka.py's forward (with and without EXCLUDE_DIAG) and backward (HAS_X_TERM,
  HAS_Y_TERM or both), for fp16, bf16 and fp32 ('ieee', 'tf32') inputs, with 2 and 4 prefixes.

The first run compiles about 130 variants (minutes on two cores); Triton's cache makes a rerun
take seconds. Skipped with a message where Triton's CUDA backend or ptxas is absent."""
import pytest

from ._triton_compile_helpers import compile_groups
from .test_triton_compile import MAX_SHARED_BYTES

# (kernel, pointer dtype, precision, the True flags, P or None) -> (spill stores, loads), per
# Triton release. The fp32 tiles of the symmetric guide forward and of the 'ieee' Matryoshka
# forward (two prefixes) hold a little more than the register file (not fixed: no bf16 / fp16
# variant spills).
KNOWN_SPILLS = {
    (3, 6): {  # the GPU machines' release
        ("_masked_lse_fwd_kernel", "*fp32", "tf32",
         ("COL_RULE", "FILTER", "HAS_COL", "HAS_GUIDE", "HAS_POS", "ONE_D_CHUNK"), None): (8, 8),
        ("_masked_lse_fwd_kernel", "*fp32", "tf32",
         ("COL_RULE", "FILTER", "HAS_COL", "HAS_GUIDE", "HAS_POS", "HAS_THRESHOLD",
          "ONE_D_CHUNK"), None): (64, 68),
        ("_matryoshka_fwd_kernel", "*fp32", "ieee", (), 2): (4, 4),
        ("_matryoshka_fwd_kernel", "*fp32", "ieee", ("EXCLUDE_DIAG",), 2): (28, 32),
    },
    (3, 9): {
        ("_masked_lse_fwd_kernel", "*fp32", "tf32",
         ("COL_RULE", "FILTER", "HAS_COL", "HAS_GUIDE", "HAS_POS", "HAS_THRESHOLD",
          "ONE_D_CHUNK"), None): (16, 16),
        ("_matryoshka_fwd_kernel", "*fp32", "ieee", (), 2): (20, 20),
    },
}


def variant(result):
    flags = result["flags"]
    on = tuple(sorted(k for k, v in flags.items() if v is True))
    return (result["kernel"], result["dtype"], flags["INPUT_PRECISION"], on, flags.get("P"))


@pytest.fixture(scope="module")
def compiled():
    return compile_groups("filter", "matryoshka", timeout=1500)


def test_every_filter_rule_and_matryoshka_launch_is_compiled(compiled):
    kernels = {}
    for r in compiled:
        kernels.setdefault(r["kernel"], set()).add(variant(r))
    filtered = [v for v in kernels["_masked_lse_fwd_kernel"] | kernels["_masked_lse_bwd_kernel"]
                if "FILTER" in v[3]]
    # 4 row rules x (alone, with the column rule) x 2 dtypes: forward with and without COUNT,
    # backward for each operand.
    assert len([v for v in filtered if v[0] == "_masked_lse_fwd_kernel"]) == 32
    assert len([v for v in filtered if v[0] == "_masked_lse_bwd_kernel"]) == 32
    assert any("COL_RULE" in v[3] and "HAS_GUIDE" in v[3] and "COUNT" in v[3] for v in filtered)
    # Matryoshka: 4 settings x P in (2, 4) x (forward 2 masks, backward 2 masks x 3 terms).
    assert len(kernels["_matryoshka_fwd_kernel"]) == 4 * 2 * 2
    assert len(kernels["_matryoshka_bwd_kernel"]) == 4 * 2 * 2 * 3


def test_shared_memory_fits_and_no_unknown_spills(compiled):
    import triton

    over = [variant(r) for r in compiled if r["shared_bytes"] > MAX_SHARED_BYTES]
    assert not over, f"over {MAX_SHARED_BYTES} bytes of shared memory: {over}"
    release = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if release not in KNOWN_SPILLS:
        pytest.skip(f"no spill list for Triton {triton.__version__}: review its spills, add one")
    known = KNOWN_SPILLS[release]
    spills = {variant(r): (r["spill_stores"], r["spill_loads"]) for r in compiled
              if r["spill_stores"] or r["spill_loads"]}
    unexpected = {v: s for v, s in spills.items()
                  if s[0] > known.get(v, (0, 0))[0] or s[1] > known.get(v, (0, 0))[1]}
    assert not unexpected, f"register spills (bytes of stores / loads): {unexpected}"
    gone = set(known) - set(spills)
    assert not gone, f"no longer spilling, remove from KNOWN_SPILLS: {sorted(gone)}"
