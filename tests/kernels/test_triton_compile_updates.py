"""The MoCo update kernels compile for sm_90 and ptxas reports no register spills: the queue's
enqueue (kernels/queue.py: keys of fp16, bf16 and fp32 into a queue of their dtype, fp32 or
fp64, with and without labels and indices, D = 16 and 512) and the momentum update
(kernels/momentum.py: every (target, online) dtype pair, 16-byte aligned and not).

Recorded from the host's own launches as tests/kernels/test_triton_compile.py does (its helpers,
tests/kernels/_triton_compile_helpers.py, groups "queue" and "momentum"). Skipped with a message
where Triton's CUDA backend or ptxas is absent."""
import pytest

from ._triton_compile_helpers import compile_groups
from .test_triton_compile import MAX_SHARED_BYTES


@pytest.fixture(scope="module")
def compiled():
    return compile_groups("queue", "momentum", timeout=1200)


def _flags(result):
    return {k: v for k, v in result["flags"].items() if not k.startswith("BLOCK")}


def test_every_enqueue_and_momentum_launch_is_compiled(compiled):
    enqueue = [r for r in compiled if r["kernel"] == "_enqueue_kernel"]
    lerp = [r for r in compiled if r["kernel"] == "_lerp_multi_tensor_kernel"]
    # (keys dtype, queue dtype): fp16 / bf16 keys into 3 queue dtypes, fp32 keys into 2.
    pairs = {(r["dtype"], _flags(r)["HAS_LABELS"]) for r in enqueue}
    assert len(pairs) == 3 * 2
    assert {r["flags"]["HAS_INDICES"] for r in enqueue} == {False, True}
    # 9 dtype pairs (kernels/momentum.py SUPPORTED_PAIRS), aligned and not.
    lerp_variants = {(r["flags"]["TGT_DTYPE"], r["flags"]["ONL_DTYPE"], r["flags"]["ALIGNED"])
                     for r in lerp}
    assert len(lerp_variants) == 9 * 2


def test_no_update_kernel_spills_or_exceeds_shared_memory(compiled):
    bad = [(r["kernel"], r["dtype"], _flags(r), r["spill_stores"], r["spill_loads"],
            r["shared_bytes"]) for r in compiled
           if r["spill_stores"] or r["spill_loads"] or r["shared_bytes"] > MAX_SHARED_BYTES]
    assert not bad, f"spills or shared memory over {MAX_SHARED_BYTES} bytes: {bad}"
