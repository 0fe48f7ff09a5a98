"""One benchmark case, run in a fresh process (started by benchmarks/runner.py).

    python benchmarks/worker.py < spec.json      # writes the result JSON to spec["result_path"]

Case spec: family, impl, problem (families.Problem fields), repeats, time_limit_s,
budget_bytes (None: no cap), reference ({"value", "method"} or None: not checked), mode
("time": check + memory + timed runs; "reach": check-free single run, for the largest-N search).
``plugins``: Python files imported first (they may register extra implementations).
Series spec (mode "series"): family, impl, and lists "problems", "references", "repeats" (one
entry per N, ascending): the cases of one implementation in one process, one warm-up, each N
measured as above (memory cap lifted, freed memory returned to the system with malloc_trim and
the peak reset before each N); one JSON line per N is appended to the result file as it ends,
and the series stops at the first N that is not OK, or before an N whose peak, extrapolated
from the two before it, exceeds 1.25 x the budget (recorded as a predicted OOM).
Floor spec: {"mode": "floor", "products": [[backend, product, rows, keys, d], ...], "dtype",
"device", "repeats"} (benchmarks/_floor.py kernel_products).

In the child, in this order: warm up on a small problem (lazy initialisation, thread pools, a
just-in-time extension load; torch.compile warms up at the real size, since it compiles per
shape); build the inputs; cap the memory (CPU: RLIMIT_AS at the address-space size now plus the
budget, so the budget is what forward+backward may map beyond start-up and inputs; CUDA: the
allocator's per-process fraction); reset the peak; one forward+backward (its loss is checked,
its peak is the memory result); then the timed runs (CUDA events on GPU), as many of
``repeats`` as fit the time limit. Failures are results: OOM, ERROR, WRONG, SKIPPED.
"""
import gc
import importlib.util
import json
import math
import os
import resource
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: sys.path[0] is this folder
    import _bootstrap

    _bootstrap.ensure_package()

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fastcontrast.cli import measure  # noqa: E402
from fastcontrast.benchmarks import families as fam  # noqa: E402
from fastcontrast.benchmarks._floor import matmul_flop, product_name, product_step  # noqa: E402

# Loss cross-check: |value - reference| <= atol + rtol * |reference|.
TOLERANCE = {"fp64": (1e-6, 1e-8), "fp32": (1e-3, 1e-5), "fp16": (2e-2, 1e-3),
             "bf16": (5e-2, 1e-3)}
WARMUP_N = 256


class OutOfMemory(Exception):
    pass


def is_oom(error):
    """Does ``error`` say an allocation failed (CPU allocator under RLIMIT_AS, CUDA, MKL)?"""
    if isinstance(error, (MemoryError, OutOfMemory)):
        return True
    if hasattr(torch, "OutOfMemoryError") and isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return any(s in text for s in ("out of memory", "can't allocate memory", "bad_alloc",
                                   "cannot allocate memory"))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timer(device):
    """time(fn) -> seconds: wall clock on CPU, CUDA events on GPU."""
    if device.type != "cuda":
        def cpu(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return cpu

    def cuda(fn):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    return cuda


def _vm_size_bytes():
    size = measure._proc_status_bytes("VmSize")
    if size is None:
        raise OSError("/proc/self/status has no VmSize")
    return size


def cap_memory(device, budget_bytes):
    """Cap what the process may allocate from now on at ``budget_bytes`` more (see module doc).
    Returns a description of the cap."""
    if budget_bytes is None:
        return "none"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = torch.cuda.memory_allocated(device)
        torch.cuda.set_per_process_memory_fraction(min(1.0, (used + budget_bytes) / total), device)
        return "cuda allocator fraction"
    limit = _vm_size_bytes() + int(budget_bytes)
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return "RLIMIT_AS = address space after start-up and inputs + budget"


SOFT_AS_LIMIT = resource.getrlimit(resource.RLIMIT_AS)[0]


def uncap_memory(device):
    """Undo cap_memory (the next N of a series sets its own cap after its inputs)."""
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()
        return
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (SOFT_AS_LIMIT, hard))
    trim_heap()


def trim_heap():
    """Collect garbage and hand freed heap pages back to the system (malloc_trim), so that the
    next measured peak counts its own pages."""
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak extra memory of what runs between start() and stop(): host RSS (VmHWM reset) on
    CPU, allocated bytes above the inputs on CUDA."""

    def __init__(self, device):
        self.device = device

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - inputs"
            return
        if measure._reset_peak() and measure._proc_status_bytes("VmHWM") is not None:
            self.method = "VmHWM reset"
            self.read_peak = lambda: measure._proc_status_bytes("VmHWM")
        else:
            self.method = "ru_maxrss (peak could not be reset; lifetime peak)"
            self.read_peak = measure._max_rss_bytes
        self.baseline = measure._current_rss_bytes()

    def stop(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self.read_peak()
        return {"peak_extra_bytes": max(0, peak - self.baseline), "baseline_bytes": self.baseline,
                "memory_method": self.method}


def make_step(loss_fn, inputs):
    """forward + backward on ``inputs``: the gradients of every input that requires grad
    (returned fresh, not accumulated); returns the loss tensor."""
    leaves = [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        loss = loss_fn(**inputs)
        torch.autograd.grad(loss, leaves)
        return loss
    return step


def check_loss(value, reference, dtype):
    """{"status", "reference", "method", "abs_err", "rel_err", "rtol", "atol"}; status "ok",
    "WRONG" or "unchecked"."""
    rtol, atol = TOLERANCE[dtype]
    if reference is None:
        return {"status": "unchecked", "rtol": rtol, "atol": atol}
    ref = reference["value"]
    err = abs(value - ref) if math.isfinite(value) else math.inf
    ok = err <= atol + rtol * abs(ref)
    return {"status": "ok" if ok else "WRONG", "reference": ref, "method": reference["method"],
            "abs_err": err, "rel_err": err / max(abs(ref), 1e-30), "rtol": rtol, "atol": atol}


def _warmup_problem(problem, impl):
    if impl.warm_full_size:
        return problem
    n = min(problem.n, WARMUP_N)
    return fam.Problem(n=n - n % 2, d=problem.d, k=min(problem.k, WARMUP_N), dtype=problem.dtype,
                       device=problem.device, seed=problem.seed + 1)


def load_plugins(paths):
    """Import the given Python files (they may register extra implementations in
    families.FAMILIES, e.g. the deliberately failing fakes of the harness's tests)."""
    for path in paths:
        name = "_bench_plugin_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def run_case(spec, warm=True, started=None):
    """The result dict of one case spec (never raises for the case's own failures); ``warm``:
    run the small warm-up first; ``started``: when the case's time limit began."""
    family = fam.FAMILIES[spec["family"]]
    impl = family.implementations[spec["impl"]]
    problem = fam.Problem(**spec["problem"])
    device = torch.device(problem.device)
    result = {"status": "OK", "reason": None, "threads": torch.get_num_threads()}
    if impl.peer is not None:
        result["peer_version"] = fam.peers.version(impl.peer)
    loss_fn, reason = fam.build(family, impl, problem.device)
    if reason is not None:
        return {**result, "status": "SKIPPED", "reason": reason}
    phase = "warm-up"
    try:
        if warm or impl.warm_full_size:
            make_step(loss_fn, family.make_inputs(_warmup_problem(problem, impl)))()
        phase = "inputs"
        step = make_step(loss_fn, family.make_inputs(problem))
        _sync(device)
        result["memory_cap"] = cap_memory(device, spec.get("budget_bytes"))
        phase = "forward+backward"
        probe, clock = MemoryProbe(device), timer(device)
        probe.start()
        holder = {}
        cold = clock(lambda: holder.update(loss=step()))
        result.update(probe.stop(), cold_s=cold)
        value = float(holder.pop("loss").detach().float())
        result["loss"] = value
        check = check_loss(value, spec.get("reference"), problem.dtype)
        result["check"] = check
        if check["status"] == "WRONG":
            return {**result, "status": "WRONG",
                    "reason": f"loss {value:.6g} != reference {check['reference']:.6g} "
                              f"(rel. err. {check['rel_err']:.2e} > rtol {check['rtol']:g})"}
        if spec.get("mode", "time") == "time":
            phase = "timed runs"
            result.update(timed_runs(step, clock, spec, cold, started))
    except Exception as error:  # noqa: BLE001 - every failure of the case is its result
        status = "OOM" if is_oom(error) else "ERROR"
        message = f"{type(error).__name__} in {phase}: {str(error).strip().splitlines()[0][:300]}" \
            if str(error).strip() else f"{type(error).__name__} in {phase}"
        if status == "ERROR":
            result["traceback"] = traceback.format_exc()[-2000:]
        return {**result, "status": status, "reason": message}
    return result


def timed_runs(step, clock, spec, cold_s, started=None):
    """Up to ``repeats`` timed forward+backward runs, as many as fit 80% of the time limit left;
    with none, the cold run's time stands (``timed_runs`` 0)."""
    limit = spec.get("time_limit_s")
    repeats = int(spec.get("repeats", 3))
    if limit is not None:
        left = 0.8 * limit - (time.monotonic() - (started or STARTED)) - 1.0
        repeats = max(0, min(repeats, int(left / max(cold_s, 1e-6))))
    samples = [clock(step) for _ in range(repeats)]
    if not samples:
        return {"median_s": cold_s, "p20_s": None, "p80_s": None, "samples_s": [], "timed_runs": 0}
    return {**measure.summarize(samples), "timed_runs": len(samples)}


def run_floor(spec):
    """The rate of each product of spec["products"] (benchmarks/_floor.py kernel_products),
    warm (two untimed calls each), then ``repeats`` interleaved rounds, each timing every product
    once (several calls per sample, the order rotated from round to round, so that a slow moment
    of a shared machine does not fall on some shapes only); per product the best sample's rate
    (what the floor takes) and the median's."""
    device = torch.device(spec["device"])
    dtype = fam.DTYPES[spec["dtype"]]
    clock = timer(device)
    runs = [product_step(tuple(product), dtype=dtype, device=device)
            for product in spec["products"]]
    calls = []
    for run in runs:
        run()
        _sync(device)
        # Several products per sample: each takes milliseconds (microseconds on a GPU).
        calls.append(max(1, min(50, int(0.02 / max(clock(run), 1e-6)))))
    samples = [[] for _ in runs]
    for round_ in range(int(spec.get("repeats", 5))):
        for j in range(len(runs)):
            i = (j + round_) % len(runs)
            samples[i].append(clock(lambda: [runs[i]() for _ in range(calls[i])]) / calls[i])
    out = []
    for product, times, n_calls in zip(spec["products"], samples, calls):
        flop = matmul_flop(*product[2:])
        out.append({"product": list(product), "name": product_name(tuple(product)),
                    "best_gflops": flop / min(times) / 1e9,
                    "median_gflops": flop / float(np.median(times)) / 1e9,
                    "samples": len(times), "calls_per_sample": n_calls})
    return {"status": "OK", "products": out}


PREDICTION_MARGIN = 1.25  # a predicted peak above 1.25 x the budget is not run


def predicted_peak(done, n):
    """The peak extra memory at ``n`` extrapolated from the last two OK results of a series
    (``done``: [(n, peak bytes)], ascending): peak ~ N^e, e fitted to those two, clamped to
    [1, 2] (linear-memory kernels to materialised N x N logits); None with fewer than two."""
    if len(done) < 2 or min(done[-2][1], done[-1][1]) <= 0:
        return None
    (n0, p0), (n1, p1) = done[-2], done[-1]
    e = min(2.0, max(1.0, math.log(p1 / p0) / math.log(n1 / n0)))
    return p1 * (n / n1) ** e


def run_series(spec):
    """The cases of one implementation at ascending N in this process (see the module doc).
    An N whose predicted peak (predicted_peak) exceeds PREDICTION_MARGIN x the budget is not
    run: its result is OOM with ``predicted`` set and the prediction in the reason."""
    device, done = None, []
    budget = spec.get("budget_bytes")
    for i, problem in enumerate(spec["problems"]):
        started = time.monotonic()
        guess = predicted_peak(done, problem["n"])
        if budget is not None and guess is not None and guess > PREDICTION_MARGIN * budget:
            result = {"status": "OOM", "predicted": True, "predicted_peak_bytes": guess,
                      "reason": f"not run: its peaks at N = {done[-2][0]} and {done[-1][0]} "
                                f"extrapolate to {guess / (1 << 30):.1f} GiB at N = "
                                f"{problem['n']}, over the {budget / (1 << 30):.1f} GiB budget"}
            with open(spec["result_path"], "a") as f:
                f.write(json.dumps(result) + "\n")
            break
        case = {**spec, "mode": "time", "problem": problem, "reference": spec["references"][i],
                "repeats": spec["repeats"][i]}
        if device is not None:
            uncap_memory(device)
        device = torch.device(problem["device"])
        result = run_case(case, warm=i == 0, started=started)
        result["wall_s"] = time.monotonic() - started
        with open(spec["result_path"], "a") as f:
            f.write(json.dumps(result) + "\n")
        if result["status"] != "OK":
            break
        done.append((problem["n"], result.get("peak_extra_bytes", 0)))
    return None


STARTED = time.monotonic()


def main():
    spec = json.loads(sys.stdin.read())
    load_plugins(spec.get("plugins", ()))
    if spec.get("mode") == "series":
        run_series(spec)
        return 0
    result = run_floor(spec) if spec.get("mode") == "floor" else run_case(spec)
    result["wall_s"] = time.monotonic() - STARTED
    with open(spec["result_path"], "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
