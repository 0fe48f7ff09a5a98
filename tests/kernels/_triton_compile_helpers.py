"""Compiling the Triton kernels of kernels/ for sm_90 on a machine without a GPU.

Parent side (pytest, where tests/conftest.py has set TRITON_INTERPRET=1):
``run_without_interpreter`` runs Python in a subprocess without TRITON_INTERPRET (the kernel
modules read it when they are imported, and only a non-interpreted @triton.jit function can be
compiled), and skips the calling test where Triton's CUDA backend or ptxas is absent.

Child side (``python -m tests.kernels._triton_compile_helpers OP...``, OP in HOST_CALLS): the host
functions of each op are called on small CPU tensors with the module's @triton.jit kernels
replaced by recorders, so every launch the host would make on a GPU (its block config, its
constexpr flags, the types and alignment of its arguments, num_warps / num_stages) is captured
without running anything; Triton's own binder turns each launch into the signature and
specialisation a GPU launch would compile, each distinct one is compiled for sm_90, and ptxas -v
(run by Triton) reports its registers and spills. Prints one JSON list, one entry per variant."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAPABILITY = 90  # sm_90 (H100 / H200)


def skip_without_cuda_backend():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"Triton's CUDA backend is not importable here: {error}")


def run_without_interpreter(args, *, timeout, env=None):
    """stdout of `python args...` run in REPO with TRITON_INTERPRET unset (and `env` added);
    skips the test where Triton's CUDA backend or ptxas is missing, fails on any other error."""
    skip_without_cuda_backend()
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child_env.update(env or {})
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=child_env)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("Triton found no ptxas: kernels not compile-checked")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def compile_groups(*groups, timeout):
    """The compiled variants (a list of dicts, ``_compile``) of the host call groups ``groups``
    (HOST_CALLS), compiled in a child without the interpreter."""
    stdout = run_without_interpreter(["-m", "tests.kernels._triton_compile_helpers", *groups],
                                     timeout=timeout)
    return json.loads(stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------

# (input dtype, torch float32 matmul precision): the host's INPUT_PRECISION follows the setting
# for fp32 ("highest" -> 'ieee', "high" -> 'tf32') and is 'tf32' (ignored by tl.dot) for fp16/bf16.
DTYPE_SETTINGS = (("float16", "high"), ("bfloat16", "high"), ("float32", "highest"),
                  ("float32", "high"))
# Feature dimensions the host is called with: the one-chunk configs (BLOCK_D = next power of two
# of D, up to the config's largest single chunk) and a D that every config splits into chunks.
# Of the launches that differ only in BLOCK_D, the largest tile (most registers) is compiled.
DIMS = (16, 32, 64, 128, 512)
ROWS = 256  # N = M: a multiple of 16, like most batches (the same specialisation)


def _infonce_host_calls(infonce, q, keys):
    """Every flag combination masked_lse_forward / masked_lse_backward can launch, the backward
    with each of its configs for D in chunks."""
    import torch

    from fastcontrast._config import override

    n, m = q.shape[0], keys.shape[0]
    alpha, beta = torch.ones(n), torch.ones(m)
    lse, grad = torch.zeros(n), torch.ones(n)
    ids = (torch.arange(n), torch.arange(m))
    for exclude_diag in (False, True):
        for row_ids, col_ids in ((None, None), ids):
            masks = dict(exclude_diag=exclude_diag, row_ids=row_ids, col_ids=col_ids)
            for with_col in (False, True):
                infonce.masked_lse_forward(q, keys, alpha, beta, with_col_lse=with_col, **masks)
                col = (torch.zeros(m), torch.ones(m)) if with_col else (None, None)
                # Every backward config autotuning may pick (D in chunks), each pinned in turn.
                for pin in range(len(infonce._split_candidates(infonce._input_precision(q.dtype)))):
                    with override(triton_config=pin):
                        infonce.masked_lse_backward(q, keys, alpha, beta, lse, grad, *col, **masks)


def _siglip_host_calls(siglip, x, y):
    """siglip_forward, and siglip_backward for every (need_gx, need_gy)."""
    import torch

    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    siglip.siglip_forward(x, y, scale, bias)
    for need_gx in (False, True):
        for need_gy in (False, True):
            siglip.siglip_backward(x, y, scale, bias, torch.ones(x.shape[0]), need_gx=need_gx,
                                   need_gy=need_gy)


def _distill_host_calls(distill, a, b):
    """distill_forward without and with the column statistics, distill_backward for rows only
    and for rows and columns (gq and gk each)."""
    import torch

    s_scale, t_scale = torch.tensor(14.0), torch.tensor(20.0)
    for with_cols in (False, True):
        distill.distill_forward(a, b, a, b, s_scale, t_scale, with_cols=with_cols)
    stats, grad = torch.zeros(3, a.shape[0]), torch.ones(a.shape[0])
    distill.distill_backward(a, b, a, b, s_scale, t_scale, stats, grad)
    distill.distill_backward(a, b, a, b, s_scale, t_scale, stats, grad, stats, grad)


def _filter_host_calls(infonce, q, keys):
    """The false-negative filter's launches (FILTER): each row rule (margin threshold, with and
    without the positive's column; guide; both), alone and with the column rule of a symmetric
    pass (COL_RULE, with the column lse), the forward with and without the dropped counts
    (COUNT), and the backward for dq and dkeys (FILTER_ON_X both ways); the default backward
    config only (the plain kernels cover the autotuning candidates)."""
    import torch

    n, m = q.shape[0], keys.shape[0]
    alpha, beta = torch.ones(n), torch.ones(m)
    lse, grad = torch.zeros(n), torch.ones(n)
    guide_q, guide_keys = q[:, :8].contiguous(), keys[:, :8].contiguous()
    positives = torch.arange(n)
    rules = [dict(threshold=torch.zeros(n)),
             dict(threshold=torch.zeros(n), positive_col=positives),
             dict(guide_q=guide_q, guide_keys=guide_keys, guide_threshold=torch.zeros(n),
                  positive_col=positives),
             dict(threshold=torch.zeros(n), guide_q=guide_q, guide_keys=guide_keys,
                  guide_threshold=torch.zeros(n), positive_col=positives)]
    for rule in rules:
        column_rule = dict(col_positive_row=torch.arange(m),
                           col_threshold=torch.zeros(m) if "threshold" in rule else None,
                           col_guide_threshold=torch.zeros(m) if "guide_q" in rule else None)
        for symmetric in (False, True):
            lse_filter = dict(rule, **(column_rule if symmetric else {}))
            infonce.masked_lse_forward(q, keys, alpha, beta, with_col_lse=symmetric,
                                       **lse_filter)
            infonce.masked_lse_dropped(q, keys, alpha, beta, **lse_filter)
            col = (torch.zeros(m), torch.ones(m)) if symmetric else (None, None)
            infonce.masked_lse_backward(q, keys, alpha, beta, lse, grad, *col, **lse_filter)


def _matryoshka_host_calls(matryoshka, x, y):
    """matryoshka_lse_forward with and without the diagonal mask and the column lse, and its
    backward for the rows alone and for rows and columns, at four prefixes of D (two where D
    is too small)."""
    import torch

    d = x.shape[1]
    bounds = (0, d // 8, d // 4, d // 2, d) if d >= 32 else (0, d // 2, d)
    p = len(bounds) - 1
    alpha, beta = torch.ones(p, x.shape[0]), torch.ones(p, y.shape[0])
    lse, grad = torch.zeros(p, x.shape[0]), torch.ones(p, x.shape[0])
    for exclude_diag in (False, True):
        for with_cols in (False, True):
            matryoshka.matryoshka_lse_forward(x, y, alpha, beta, bounds,
                                              exclude_diag=exclude_diag, with_col_lse=with_cols)
            col = (lse, grad) if with_cols else (None, None)
            matryoshka.matryoshka_lse_backward(x, y, alpha, beta, bounds, lse, grad, *col,
                                               exclude_diag=exclude_diag)


def _queue_host_calls(queue, keys, _):
    """enqueue_ of a batch into a queue of the batch's dtype and of float32 / float64 (the
    kernel casts), with and without labels and indices."""
    import torch

    batch, d = keys.shape
    for dst_dtype in sorted({keys.dtype, torch.float32, torch.float64}, key=str):
        dst = torch.zeros(batch + 44, d, dtype=dst_dtype)
        for extras in (False, True):
            ids = dict(dst_labels=torch.zeros(dst.shape[0], dtype=torch.int64),
                       labels=torch.arange(batch), dst_indices=torch.zeros(
                           dst.shape[0], dtype=torch.int64), indices=torch.arange(batch))
            queue.enqueue_(dst, keys, 40, 0, torch.zeros((), dtype=torch.int64),
                           torch.zeros((), dtype=torch.int64), **(ids if extras else {}))


def _momentum_host_calls(momentum, *_):
    """lerp_multi_tensor_ for every (target, online) dtype pair, with 16-byte aligned and
    unaligned tensors."""
    import torch

    for target_dtype, online_dtype in sorted(momentum.SUPPORTED_PAIRS, key=str):
        for offset in (0, 1):
            target = torch.zeros(10001, dtype=target_dtype)[offset:]
            online = torch.zeros(10001, dtype=online_dtype)[offset:]
            momentum.lerp_multi_tensor_([target], [online], 0.01)


# The kernel module each group of host calls drives (default: the group's own name).
HOST_CALLS = {"infonce": _infonce_host_calls, "siglip": _siglip_host_calls,
              "distill": _distill_host_calls, "filter": _filter_host_calls,
              "matryoshka": _matryoshka_host_calls, "queue": _queue_host_calls,
              "momentum": _momentum_host_calls}
MODULES = {"filter": "infonce"}
# Groups called on fewer settings than (DTYPE_SETTINGS, DIMS): the filter's flags multiply the
# plain kernels' variants (which cover D in chunks and fp16 / fp32 'ieee'), so it is compiled for
# the GPU's usual inputs (bf16, fp32 'tf32') at one D in one chunk.
SETTINGS = {"filter": ((("bfloat16", "high"), ("float32", "high")), (128,)),
            "matryoshka": (DTYPE_SETTINGS, (16, 128)),
            "queue": (DTYPE_SETTINGS[:3], (16, 512)), "momentum": (DTYPE_SETTINGS[:1], (16,))}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, launches):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, args, kwargs))


def record_launches(module, host_calls, dtype_settings=DTYPE_SETTINGS, dims=DIMS):
    """[(kernel, args, kwargs)] of the launches `host_calls(module, a, b)` makes for every dtype
    setting and D, with CPU tensors standing in for CUDA ones (the device check is lifted)."""
    import torch
    from triton.runtime.jit import JITFunction

    launches = []
    saved = dict(vars(module))
    for name, value in saved.items():
        if isinstance(value, JITFunction):
            setattr(module, name, _Recorder(value, launches))
    module._check_device = lambda name, device: None
    try:
        for dtype, precision in dtype_settings:
            torch.set_float32_matmul_precision(precision)
            for d in dims:
                a = torch.randn(ROWS, d).to(getattr(torch, dtype))
                b = torch.randn(ROWS, d).to(getattr(torch, dtype))
                host_calls(module, a, b)
    finally:
        for name, value in saved.items():
            setattr(module, name, value)
        torch.set_float32_matmul_precision("highest")
    return launches


def compile_jobs(launches):
    """Distinct compile jobs (kernel, signature, constexprs, attrs, options) of the launches,
    keeping, of those that differ only in BLOCK_D, the one with the largest BLOCK_D."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", CAPABILITY, 32))
    jobs = {}
    for fn, args, kwargs in launches:
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                              specialization, options)
        flags = {fn.arg_names[k[0]]: v for k, v in constexprs.items()}
        block_d = flags.pop("BLOCK_D", 0)
        key = repr((fn.__name__, sorted(signature.items()), sorted(flags.items()),
                    sorted(attrs.items()), sorted(options.__dict__.items())))
        if key not in jobs or jobs[key][0] < block_d:
            jobs[key] = (block_d, (fn, signature, constexprs, attrs, options.__dict__))
    return [job for _, job in jobs.values()]


_JOBS = []  # the jobs of this process, inherited by the forked compile workers
PTXAS_REPORT = "fastcontrast_ptxas_v.txt"  # our copy of the report, in the kernel's cache group


def _compile_with_report(fn, signature, constexprs, attrs, options):
    """(compiled kernel, ptxas -v report). Triton prints the report only when it runs ptxas, not
    on a hit of its cache, so the report is kept beside the cached kernel (same key: the
    sources, options and compiler versions) and the kernel recompiled if that copy is missing."""
    import contextlib
    import io

    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.cache import get_cache_manager

    knobs.nvidia.dump_ptxas_log = True
    for always_compile in (False, True):
        knobs.compilation.always_compile = always_compile
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", CAPABILITY, 32), options=options)
        cache = get_cache_manager(compiled.hash)
        if "spill stores" in log.getvalue():
            cache.put(log.getvalue(), PTXAS_REPORT, binary=False)
            return compiled, log.getvalue()
        path = cache.get_file(PTXAS_REPORT)
        if path is not None:
            with open(path) as f:
                return compiled, f.read()
    raise AssertionError(f"no ptxas -v report for {fn.__name__}:\n{log.getvalue()}")


def _compile(index):
    """Compile _JOBS[index] for sm_90: its flags, and registers and spills from ptxas -v."""
    import hashlib
    import re

    fn, signature, constexprs, attrs, options = _JOBS[index]
    compiled, report = _compile_with_report(fn, signature, constexprs, attrs, options)
    spills = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                       r"loads", report)
    registers = re.search(r"Used (\d+) registers", report)
    assert spills and registers, f"unexpected ptxas -v report for {fn.__name__}:\n{report}"
    # PTX without line info: equal hashes mean equal code whatever moved in the sources.
    ptx = "\n".join(line for line in compiled.asm["ptx"].splitlines()
                    if not line.lstrip().startswith((".loc", ".file", "//")))
    return {"kernel": fn.__name__, "dtype": next(v for v in signature.values() if v != "constexpr"),
            "flags": {fn.arg_names[k[0]]: v if isinstance(v, (bool, int, float, str)) else str(v)
                      for k, v in constexprs.items()},
            "num_warps": options["num_warps"], "num_stages": options["num_stages"],
            "registers": int(registers.group(1)), "shared_bytes": int(compiled.metadata.shared),
            "stack_bytes": int(spills.group(1)),
            "spill_stores": int(spills.group(2)), "spill_loads": int(spills.group(3)),
            "ptx_sha256": hashlib.sha256(ptx.encode()).hexdigest()}


def compile_all(jobs, workers):
    """_compile over `jobs` in `workers` forked processes (the jobs hold functions: not pickled)."""
    import concurrent.futures
    import multiprocessing

    _JOBS[:] = jobs
    if workers <= 1:
        return [_compile(i) for i in range(len(jobs))]
    with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_compile, range(len(jobs))))


def main(ops):
    import importlib

    import torch

    torch.set_num_threads(1)
    jobs = []
    for op in ops:
        module = importlib.import_module(f"fastcontrast.kernels.{MODULES.get(op, op)}")
        jobs += compile_jobs(record_launches(module, HOST_CALLS[op],
                                             *SETTINGS.get(op, (DTYPE_SETTINGS, DIMS))))
    workers = int(os.environ.get("FASTCONTRAST_COMPILE_WORKERS", "0")) or min(
        4, len(os.sched_getaffinity(0)))
    print(json.dumps(compile_all(jobs, workers)))


if __name__ == "__main__":
    main(sys.argv[1:])
