"""Every symmetric-Gram Triton kernel variant (kernels/gram.py) the host functions can launch
compiles for sm_90, ptxas reports no register spills, and the shared memory of each launch fits
one H200 block (227 KiB, the sm_90 opt-in maximum).

The variants are recorded from the host's own launches, as tests/kernels/test_triton_compile.py
does (its helpers, tests/kernels/_triton_compile_helpers.py): every combination of EXCLUDE_DIAG,
HAS_IDS and ONE_D_CHUNK of the forward kernel, for fp16, bf16 and fp32 ('ieee' and 'tf32'). The
backward is kernels/infonce.py's _masked_lse_bwd_kernel with both lse terms (HAS_LSE_X and
HAS_LSE_Y), whose variants tests/kernels/test_triton_compile.py compiles. Skipped where Triton's
CUDA backend or ptxas is absent."""
import itertools
import json
import os
import sys

import pytest

from ._triton_compile_helpers import run_without_interpreter

SM90_MAX_SHARED_BYTES = 227 * 1024
BOOLS = (False, True)
DTYPE_PRECISIONS = (("*fp16", "tf32"), ("*bf16", "tf32"), ("*fp32", "ieee"), ("*fp32", "tf32"))
FLAGS = ("EXCLUDE_DIAG", "HAS_IDS", "ONE_D_CHUNK")
KERNELS = ("_gram_fwd_kernel",)


def _gram_host_calls(gram, z, _):
    """gram_lse_forward under every mask the host can pass."""
    import torch

    n = z.shape[0]
    alpha, beta = torch.ones(n), torch.ones(n)
    for exclude_diag in BOOLS:
        for ids in ((None, None), (torch.arange(n), torch.arange(n))):
            masks = dict(exclude_diag=exclude_diag, row_ids=ids[0], col_ids=ids[1])
            gram.gram_lse_forward(z, alpha, beta, **masks)


def _compile_with_shared(index):
    """The helpers' result for job `index`, with the launch's shared memory (a cache hit)."""
    from . import _triton_compile_helpers as helpers

    result = helpers._compile(index)
    compiled, _ = helpers._compile_with_report(*helpers._JOBS[index])
    result["shared_bytes"] = int(compiled.metadata.shared)
    return result


def _child():
    """Child side: record, compile, print the results as one JSON list."""
    import concurrent.futures
    import importlib
    import multiprocessing

    import torch

    from . import _triton_compile_helpers as helpers

    torch.set_num_threads(1)
    module = importlib.import_module("fastcontrast.kernels.gram")
    jobs = helpers.compile_jobs(helpers.record_launches(module, _gram_host_calls))
    helpers._JOBS[:] = jobs
    workers = int(os.environ.get("FASTCONTRAST_COMPILE_WORKERS", "0")) or min(
        4, len(os.sched_getaffinity(0)))
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork")) as pool:
        print(json.dumps(list(pool.map(_compile_with_shared, range(len(jobs))))))


@pytest.fixture(scope="module")
def compiled():
    stdout = run_without_interpreter(["-m", "tests.kernels.test_triton_gram_compile"],
                                     timeout=1500)
    return json.loads(stdout.strip().splitlines()[-1])


def _variant(result):
    flags = result["flags"]
    return (result["kernel"], result["dtype"], flags["INPUT_PRECISION"],
            tuple(flags[name] for name in FLAGS))


def test_every_gram_launch_variant_is_compiled(compiled):
    expected = {(kernel, dtype, precision, values) for kernel in KERNELS
                for values in itertools.product(BOOLS, BOOLS, BOOLS)
                for dtype, precision in DTYPE_PRECISIONS}
    got = [_variant(r) for r in compiled]
    assert len(got) == len(set(got)) == len(expected) == 32
    assert set(got) == expected, (sorted(expected - set(got)), sorted(set(got) - expected))


def test_no_gram_variant_spills_or_exceeds_shared_memory(compiled):
    for r in sorted(compiled, key=_variant):
        print(_variant(r), r["registers"], r["spill_stores"], r["spill_loads"],
              r["shared_bytes"])
    spilling = [_variant(r) for r in compiled if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, spilling
    too_large = [(_variant(r), r["shared_bytes"]) for r in compiled
                 if r["shared_bytes"] > SM90_MAX_SHARED_BYTES]
    assert not too_large, too_large


if __name__ == "__main__":
    sys.exit(_child())
