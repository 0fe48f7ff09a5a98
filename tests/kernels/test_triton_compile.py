"""Every InfoNCE and SigLIP Triton kernel variant the host functions can launch compiles for
sm_90 with Triton's own compiler, and ptxas reports no register spills.

The variants are the host's own launches: tests/kernels/_triton_compile_helpers.py calls the host
functions of kernels/infonce.py and kernels/siglip.py in a subprocess without the interpreter,
records each launch instead of running it (block config, constexpr flags, argument types and
alignment, num_warps / num_stages: what a GPU run would compile) and compiles each distinct one.
That is every combination of EXCLUDE_DIAG, HAS_IDS, HAS_COL / HAS_LSE_X, HAS_LSE_Y /
GRAD_ON_OUTER, ACCUMULATE and ONE_D_CHUNK, for fp16, bf16 and fp32 ('ieee' and 'tf32'), with the
GPU block config the host picks for the largest D it runs as one chunk and for D = 512 (chunks).

The first run compiles all 192 variants: about two minutes on two idle cores (more on a busy
machine). Triton's cache then holds the kernels and a copy of each ptxas report, so a rerun with
unchanged kernels takes seconds. Skipped with a message where Triton's CUDA backend or ptxas is
absent."""

import itertools
import json

import pytest

from ._triton_compile_helpers import run_without_interpreter

BOOLS = (False, True)
# (pointer dtype of the inputs, INPUT_PRECISION) of the launches: fp16 / bf16 tiles ignore the
# precision (the host passes 'tf32'); fp32 follows torch's float32 matmul setting.
DTYPE_PRECISIONS = (("*fp16", "tf32"), ("*bf16", "tf32"), ("*fp32", "ieee"), ("*fp32", "tf32"))
# The flags of each kernel, and every combination of them the host functions launch.
FLAGS = {
    "_masked_lse_fwd_kernel": ("EXCLUDE_DIAG", "HAS_IDS", "HAS_COL", "ONE_D_CHUNK"),
    "_masked_lse_bwd_kernel": ("EXCLUDE_DIAG", "HAS_IDS", "HAS_LSE_X", "HAS_LSE_Y", "ONE_D_CHUNK"),
    "_siglip_fwd_kernel": ("ONE_D_CHUNK",),
    "_siglip_bwd_kernel": ("GRAD_ON_OUTER", "ACCUMULATE", "ONE_D_CHUNK"),
}
LAUNCHED = {
    "_masked_lse_fwd_kernel": list(itertools.product(BOOLS, BOOLS, BOOLS, BOOLS)),
    # dq: HAS_LSE_X, and HAS_LSE_Y with column terms; dkeys: the roles swapped.
    "_masked_lse_bwd_kernel": [
        (e, i, lx, ly, one)
        for e, i, (lx, ly), one in itertools.product(
            BOOLS, BOOLS, [(True, False), (False, True), (True, True)], BOOLS
        )
    ],
    "_siglip_fwd_kernel": [(one,) for one in BOOLS],
    # gx with d bias, d bias alone (need_gx False), gy.
    "_siglip_bwd_kernel": [
        (outer, acc, one)
        for (outer, acc), one in itertools.product(
            [(True, True), (True, False), (False, True)], BOOLS
        )
    ],
}


# Variants that spill today, with the bytes of spill stores / loads ptxas reports: listed, not
# dropped, so that any other spill, a larger one, or one that went away fails the test. Both
# appear with Triton 3.9, whose ptxas 13.4 runs with --regAllocOptLevel=2 (Triton's workaround
# for a ptxas bug); without that flag neither spills. Not fixed here: every fix found changes the
# config of many other variants and needs a GPU to measure (the 'ieee' forward does not spill
# with num_warps=4 or BLOCK_M=32, the backward with num_stages=1 or BLOCK_Y=32).
KNOWN_SPILLS = {
    # fp32 'ieee', 64 x 64 tile, D in one chunk of 32: 80 registers.
    ("_masked_lse_fwd_kernel", "*fp32", "ieee", (False, False, False, True)): (8, 12),
    # Added with the NaN-propagating backward (issue 10: dS formed from the raw scores, masked
    # entries zeroed after the exp): id-masked variants at 255 registers now spill. Not yet
    # timed on a GPU; candidates: num_stages=1, or the mask applied to the scores again.
    ("_masked_lse_bwd_kernel", "*bf16", "tf32", (True, True, True, True, True)): (12, 12),
    ("_masked_lse_bwd_kernel", "*fp16", "tf32", (True, True, True, True, True)): (12, 12),
    ("_masked_lse_bwd_kernel", "*fp32", "ieee", (False, True, True, True, True)): (4, 4),
    ("_masked_lse_bwd_kernel", "*fp32", "ieee", (True, True, False, True, True)): (56, 60),
    ("_masked_lse_bwd_kernel", "*fp32", "ieee", (True, True, True, False, True)): (72, 80),
    ("_masked_lse_bwd_kernel", "*fp32", "ieee", (True, True, True, True, True)): (72, 80),
}


def variant(result):
    """(kernel, dtype, precision, flag values in FLAGS order) of a compiled variant."""
    flags = result["flags"]
    return (
        result["kernel"],
        result["dtype"],
        flags["INPUT_PRECISION"],
        tuple(flags[name] for name in FLAGS[result["kernel"]]),
    )


def table(results):
    rows = [
        f"{'kernel':24} {'dtype':6} {'prec':5} {'flags':48} {'BLOCK_X/Y/D':13} {'regs':>4} "
        f"{'spill st/ld':>11}"
    ]
    for r in sorted(results, key=variant):
        kernel, dtype, precision, values = variant(r)
        on = ",".join(n for n, v in zip(FLAGS[kernel], values) if v) or "-"
        f = r["flags"]
        blocks = "/".join(str(f[k]) for k in f if k.startswith("BLOCK_"))
        rows.append(
            f"{kernel:24} {dtype[1:]:6} {precision:5} {on:48} {blocks:13} "
            f"{r['registers']:4} {r['spill_stores']:5}/{r['spill_loads']:<5}"
        )
    return "\n".join(rows)


@pytest.fixture(scope="module")
def compiled():
    stdout = run_without_interpreter(
        ["-m", "tests.kernels._triton_compile_helpers", "infonce", "siglip"], timeout=1500
    )
    return json.loads(stdout.strip().splitlines()[-1])


def test_every_launch_variant_is_compiled(compiled):
    expected = {
        (kernel, dtype, precision, values)
        for kernel, combos in LAUNCHED.items()
        for values in combos
        for dtype, precision in DTYPE_PRECISIONS
    }
    got = [variant(r) for r in compiled]
    assert len(got) == len(set(got)) == len(expected) == 192
    assert set(got) == expected, (sorted(expected - set(got)), sorted(set(got) - expected))
    assert not any(r["flags"]["UPCAST"] for r in compiled)  # an interpreter-only flag


def test_no_variant_spills_registers_but_the_known_ones(compiled):
    print("\n" + table(compiled))  # shown with pytest -s / -rP
    spilling = {variant(r): r for r in compiled if r["spill_stores"] or r["spill_loads"]}
    unexpected = [
        r
        for v, r in spilling.items()
        if r["spill_stores"] > KNOWN_SPILLS.get(v, (0, 0))[0]
        or r["spill_loads"] > KNOWN_SPILLS.get(v, (0, 0))[1]
    ]
    assert not unexpected, "register spills (bytes of spill stores / loads):\n" + table(unexpected)
    gone = set(KNOWN_SPILLS) - set(spilling)
    assert not gone, f"no longer spilling, remove from KNOWN_SPILLS: {sorted(gone)}"
