"""Measuring helpers shared by the demo and the benchmarks: wall-clock medians, interleaved across
implementations, and the peak extra host memory of one call, measured in a fresh process.

    samples = time_interleaved({"a": step_a, "b": step_b}, repeats=5)     # {name: [seconds]}
    mem = peak_extra_memory(make_step, *args)    # make_step: importable top-level function
    mem.extra_bytes                              # peak RSS during step() minus RSS before it

Peak memory on CPU (Linux): in a spawned child, ``make_step(*args)`` builds the inputs and returns
a zero-argument ``step``; after a warm-up call on ``warmup_args`` (lazy initialisation, thread
pools, a just-in-time extension load), writing "5" to /proc/self/clear_refs resets the peak
(VmHWM) to the current RSS; extra = VmHWM after ``step()`` - VmRSS before it. Where the peak
cannot be reset, the process-lifetime peak (ru_maxrss) is used instead and ``method`` says so.
"""
import gc
import os
import platform
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from multiprocessing import get_context

import numpy as np

MiB = 1 << 20
GiB = 1 << 30


# ---------------------------------------------------------------------------------------------
# Time


def time_interleaved(steps, repeats, warmup=1):
    """{name: [seconds] * repeats} for zero-argument callables, run in turns.

    Each round runs every step once, the order rotated from round to round, so that a noisy
    neighbour or a slow clock phase is spread over all implementations instead of hitting one.
    ``warmup`` untimed rounds come first (first-touch page faults, lazy initialisation)."""
    names = list(steps)
    samples = {name: [] for name in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            t0 = time.perf_counter()
            steps[name]()
            elapsed = time.perf_counter() - t0
            if r >= warmup:
                samples[name].append(elapsed)
    return samples


def summarize(seconds):
    """median, p20, p80 (and the raw samples) of a list of timings, in seconds."""
    a = np.asarray(seconds, dtype=np.float64)
    return {"median_s": float(np.median(a)), "p20_s": float(np.percentile(a, 20)),
            "p80_s": float(np.percentile(a, 80)), "samples_s": [float(x) for x in a]}


def paired_ratio(numerator_s, denominator_s):
    """Median over rounds of numerator / denominator, both timed in the same round: robust to
    load that changes between rounds on a shared machine (the ratio of medians is not)."""
    return float(np.median([a / b for a, b in zip(numerator_s, denominator_s)]))


# ---------------------------------------------------------------------------------------------
# Memory


@dataclass
class MemoryResult:
    """Peak extra memory of one ``step()`` in a fresh process, in bytes."""

    extra_bytes: int      # peak resident set during step() minus resident set before it
    baseline_bytes: int   # resident set before step() (interpreter, torch, the inputs)
    peak_bytes: int
    seconds: float        # wall time of that single step() (cold: one run only)
    method: str           # "VmHWM reset" or the fallback used
    value: object = None  # what step() returned (e.g. the loss), when small and picklable

    def as_dict(self):
        return asdict(self)


def _proc_status_bytes(field):
    """VmRSS / VmHWM of this process in bytes, or None where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        return None
    return None


def _reset_peak():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _max_rss_bytes():
    """Peak resident set since the process started (ru_maxrss: kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def _current_rss_bytes():
    rss = _proc_status_bytes("VmRSS")
    return rss if rss is not None else _max_rss_bytes()


def _measure_here(make_step, args, kwargs, warmup_args):
    """Runs in the child: warm up, build the inputs, reset the peak, run step() once."""
    if warmup_args is not None:
        warm = make_step(*warmup_args, **kwargs)
        warm()
        del warm
    step = make_step(*args, **kwargs)
    gc.collect()
    if _reset_peak() and _proc_status_bytes("VmHWM") is not None:
        method = "VmHWM reset"
        read_peak = lambda: _proc_status_bytes("VmHWM")  # noqa: E731
    else:
        # The lifetime peak: an overestimate only if building the inputs peaked higher than
        # the step itself; extra is clamped at 0.
        method = "ru_maxrss (peak could not be reset; lifetime peak)"
        read_peak = _max_rss_bytes
    baseline = _current_rss_bytes()
    t0 = time.perf_counter()
    value = step()
    seconds = time.perf_counter() - t0
    peak = max(read_peak(), baseline)
    if not isinstance(value, (int, float, str, type(None))):
        value = None
    return MemoryResult(peak - baseline, baseline, peak, seconds, method, value)


def peak_extra_memory(make_step, *args, warmup_args=None, timeout=None, **kwargs):
    """Peak extra host memory of ``make_step(*args, **kwargs)()`` in a fresh spawned process.

    ``make_step`` must be a top-level function of an importable module (it is pickled by name).
    ``warmup_args``: arguments of a small warm-up problem run first in the same child (use it:
    it keeps one-time allocations out of the measurement)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        job = pool.submit(_measure_here, make_step, args, kwargs, warmup_args)
        return job.result(timeout=timeout)


def backward_step(call, *leaves):
    """A zero-argument step: ``call()`` (a scalar loss), its backward into the leaves' .grad
    (counted in a memory peak), the grads cleared again so that every step does the same work;
    returns the loss as a float."""
    def step():
        value = call()
        value.backward()
        for leaf in leaves:
            leaf.grad = None
        return float(value.detach())

    return step


def problem_parser(description, n=16384, dim=256):
    """An argparse parser with the problem size every measurement script takes: --n, --dim."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--n", type=int, default=n)
    parser.add_argument("--dim", type=int, default=dim)
    return parser


def save_json(out_dir, filename, result):
    """Writes ``result`` to out_dir/filename (the folder made if needed); nothing without a
    folder."""
    if not out_dir:
        return
    import json

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, filename), "w") as f:
        json.dump(result, f, indent=1)


def allocation_step(nbytes):
    """A step that allocates and touches ``nbytes`` (a calibration case for the memory probe)."""
    import torch

    def step():
        block = torch.ones(nbytes // 4, dtype=torch.float32)
        return float(block[-1]) if block.numel() else 0.0

    return step


# ---------------------------------------------------------------------------------------------
# Context


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info():
    """What a benchmark record needs to be comparable later: CPU, threads, versions, date."""
    import torch

    import fastcontrast

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "fastcontrast": fastcontrast.__version__,
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def format_bytes(n):
    """1536 -> '1.5 KiB'; human-readable, binary units."""
    n = float(n)
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_seconds(s):
    """0.0123 -> '12.3 ms'."""
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"
