"""The parent side of the benchmark: one fresh worker process per case, with a time limit and a
memory budget; reference values; the matmul floor; the largest-N search.

    record = Runner(budget_bytes=..., time_limit_s=...).run_case(case)

A case's result is a record (dict) whose ``status`` is one of
    OK       checked against the reference, memory and time measured
    WRONG    its loss differs from fastcontrast's reference: not timed
    OOM      an allocation failed under the budget (or the process was killed by SIGKILL)
    TIMEOUT  the process ran past the per-case time limit and was killed
    SKIPPED  cannot run here (peer not installed, backend or function missing); ``reason`` says
    ERROR / CRASH  any other failure (exception / process died), with the message
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace

import torch

from . import families as fam

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
REFERENCE_MAX_BYTES = 2 << 30  # above this, the float64 logits are not materialised (see below)
REFERENCE_FP64_MAX_BYTES = 256 << 20  # above this, the reference runs in float32 (see below)
GiB = 1 << 30


@dataclass(frozen=True)
class Case:
    family: str
    impl: str
    problem: fam.Problem
    mode: str = "time"   # "time" | "reach" (one checked-free run: the largest-N search)
    part: str = "grid"   # which table it belongs to ("headline", "grid", "search", "targets")


def _status_from_exit(returncode, stderr_tail):
    if returncode is not None and returncode < 0:
        sig = -returncode
        if sig == signal.SIGKILL:
            return "OOM", "killed by SIGKILL (the kernel's out-of-memory killer)"
        return "CRASH", f"killed by signal {sig}: {stderr_tail}"
    return "CRASH", f"exit status {returncode} without a result: {stderr_tail}"


def run_worker(spec, timeout_s, lines=False):
    """Run benchmarks/worker.py on ``spec`` in a new process group; the result dict (TIMEOUT /
    CRASH / OOM made up here when the process did not write one). ``lines`` (a series): the
    list of the result lines written, then the made-up result of the N it stopped in, if any."""
    with tempfile.TemporaryDirectory(prefix="fastcontrast-bench-") as tmp:
        spec = {**spec, "result_path": os.path.join(tmp, "result.json")}
        with open(os.path.join(tmp, "out.log"), "w+") as log:
            proc = subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE, stdout=log,
                                    stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            timeout = None
            try:
                proc.communicate(json.dumps(spec), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                timeout = {"status": "TIMEOUT", "reason": f"still running after "
                                                          f"{timeout_s:.0f} s (time limit)"}
            log.seek(0)
            tail = " | ".join(log.read().strip().splitlines()[-3:])[-600:]
        written = []
        if os.path.exists(spec["result_path"]):
            with open(spec["result_path"]) as f:
                written = [json.loads(line) for line in f.read().splitlines() if line.strip()] \
                    if lines else [json.load(f)]
        if timeout is None and written and (not lines or proc.returncode == 0):
            return written if lines else written[0]
        if timeout is None:
            status, reason = _status_from_exit(proc.returncode, tail)
            timeout = {"status": status, "reason": reason}
        return written + [timeout] if lines else timeout


def _float64(inputs):
    return {name: t.detach().to(torch.float64) if t.is_floating_point() else t
            for name, t in inputs.items()}


def reference_value(family, problem):
    """{"value", "method"}: the family's loss in float64 on the case's inputs (rounded to the
    case's dtype first) through fastcontrast's reference backend; when the float64 logits would
    exceed REFERENCE_MAX_BYTES, through fastcontrast's chunked torch backend in float64 (itself
    tested against the reference), and the method says so. None if neither can run.

    A case of at most float32 precision whose float64 logits would exceed
    REFERENCE_FP64_MAX_BYTES (N = M > 5792) gets the reference backend in float32 on its fp32
    inputs instead: half the time of float64 on a CPU, and its rounding error (~1e-7 relative,
    a mean of log-sum-exps) is four orders of magnitude below the fp32 check's tolerance."""
    logits = problem.n * family.columns(problem) * 8
    try:
        with torch.no_grad():
            if logits > REFERENCE_FP64_MAX_BYTES and problem.dtype in ("fp32", "bf16", "fp16") \
                    and logits // 2 <= REFERENCE_MAX_BYTES:
                inputs = {name: t.detach().float() if t.is_floating_point() else t
                          for name, t in family.make_inputs(problem).items()}
                return {"value": float(family.reference(**inputs)),
                        "method": f"reference, float32 (float64 logits would take "
                                  f"{logits / GiB:.1f} GiB)"}
            inputs = _float64(family.make_inputs(problem))
            if logits <= REFERENCE_MAX_BYTES:
                return {"value": float(family.reference(**inputs)),
                        "method": "reference, float64"}
            value = float(family.implementations["fastcontrast[torch]"].make()(**inputs))
        return {"value": value, "method": f"torch backend, float64 (the reference's logits "
                                          f"would take {logits / GiB:.0f} GiB)"}
    finally:
        if torch.device(problem.device).type == "cuda":  # leave the GPU to the workers
            torch.cuda.empty_cache()


class Runner:
    """Runs cases one at a time (the machine's cores belong to the case being measured)."""

    def __init__(self, budget_bytes=None, time_limit_s=120.0, repeats=3, progress=None,
                 plugins=()):
        self.plugins = list(plugins)  # files the workers import first (worker.load_plugins)
        self.budget_bytes = budget_bytes
        self.time_limit_s = time_limit_s
        self.repeats = repeats
        self.progress = progress or (lambda message: None)
        self._references = {}

    def reference(self, family, problem):
        key = (family.name, problem)
        if key not in self._references:
            try:
                self._references[key] = reference_value(family, problem)
            except Exception as error:  # noqa: BLE001 - e.g. no memory for the oracle
                self._references[key] = None
                self.progress(f"reference for {family.name} {problem} failed: {error}")
        return self._references[key]

    @staticmethod
    def describe(case):
        """The fields of a record that name the case."""
        family = fam.FAMILIES[case.family]
        return {**asdict(case.problem), "family": case.family, "impl": case.impl,
                "kind": family.implementations[case.impl].kind,
                "backend": fam.backend_of(case.impl), "mode": case.mode, "part": case.part,
                "m": family.columns(case.problem)}

    @staticmethod
    def case_of(record):
        """The Case a record describes."""
        problem = fam.Problem(**{k: record[k] for k in ("n", "d", "k", "dtype", "device",
                                                         "seed")})
        return Case(record["family"], record["impl"], problem, record["mode"], record["part"])

    def run_case(self, case, budget_bytes=None, time_limit_s=None):
        """The record of one case (see the module docstring for its statuses)."""
        family = fam.FAMILIES[case.family]
        impl = family.implementations[case.impl]
        budget = self.budget_bytes if budget_bytes is None else budget_bytes
        limit = time_limit_s or self.time_limit_s
        record = {**self.describe(case), "budget_bytes": budget, "time_limit_s": limit}
        reason = fam.unavailable(family, impl, case.problem.device)
        if reason is None and impl.peer is not None:
            reason = fam.peers.installed(impl.peer)
        if reason is not None:  # known without starting a process
            return {**record, "status": "SKIPPED", "reason": reason}
        reference = None if case.mode == "reach" else self.reference(family, case.problem)
        spec = {"family": case.family, "impl": case.impl, "problem": asdict(case.problem),
                "repeats": self.repeats, "time_limit_s": limit, "budget_bytes": budget,
                "reference": reference, "mode": case.mode, "plugins": self.plugins}
        record.update(run_worker(spec, timeout_s=limit))
        return annotate(record, family, impl)

    def floor(self, d, dtype, device, products, repeats=5):
        """The best warm torch.mm rate over ``products`` (benchmarks/_floor.py kernel_products:
        the shapes the kernels run), measured in a worker: {"products": [each product's best
        and median rate], "best" (its name), "shape" (its rows, keys, dim), "best_gflops"}."""
        products = sorted(products)
        spec = {"mode": "floor", "products": [list(p) for p in products], "dtype": dtype,
                "device": device, "repeats": repeats}
        result = run_worker(spec, timeout_s=max(self.time_limit_s, 120))
        base = {"d": d, "dtype": dtype, "device": device}
        if result.get("status") != "OK":
            return {**base, "status": result.get("status"), "reason": result.get("reason"),
                    "products": [list(p) for p in products]}
        best = max(result["products"], key=lambda p: p["best_gflops"])
        return {**base, "status": "OK", "products": result["products"], "best": best["name"],
                "shape": best["product"][2:], "best_gflops": best["best_gflops"],
                "matmul_best_gflops": best["best_gflops"], "set_by": "matmul",
                "wall_s": result.get("wall_s")}

    def run_series(self, cases, repeats):
        """The records of one implementation's cases (same family, D, dtype; ascending N) run
        in ONE worker process (worker.run_series); ``repeats``: timed runs per case. Cases after
        the first that is not OK are not run (their records say so)."""
        family = fam.FAMILIES[cases[0].family]
        impl = family.implementations[cases[0].impl]
        budget, limit = self.budget_bytes, self.time_limit_s
        records = [{**self.describe(c), "budget_bytes": budget, "time_limit_s": limit}
                   for c in cases]
        reason = fam.unavailable(family, impl, cases[0].problem.device)
        if reason is None and impl.peer is not None:
            reason = fam.peers.installed(impl.peer)
        if reason is not None:
            return [{**r, "status": "SKIPPED", "reason": reason} for r in records]
        spec = {"mode": "series", "family": family.name, "impl": impl.name,
                "problems": [asdict(c.problem) for c in cases],
                "references": [self.reference(family, c.problem) for c in cases],
                "repeats": list(repeats), "time_limit_s": limit, "budget_bytes": budget,
                "plugins": self.plugins}
        results = run_worker(spec, timeout_s=limit * len(cases), lines=True)
        out = []
        for i, record in enumerate(records):
            if i < len(results):
                record.update(results[i])
                out.append(annotate(record, family, impl))
            else:
                fell = out[len(results) - 1]  # the N the series stopped at
                out.append({**record, "status": fell["status"], "inferred": True,
                            "reason": f"not run: {fell['status']} at N = {fell['n']} already"})
        return out

    def largest_n(self, case, start_record, budget_bytes, max_n, time_limit_s):
        """Largest N (doubling from the start record's N) that completes forward+backward
        within ``budget_bytes`` of extra memory. The start size counts as reached when its
        measured peak is within the budget. Returns (summary dict, [records of the runs])."""
        runs = []
        n = case.problem.n
        fits = start_record.get("status") == "OK" and \
            start_record.get("peak_extra_bytes", budget_bytes + 1) <= budget_bytes
        step = 2 if fits else 0.5
        largest, stop = (n if fits else None), None
        while True:
            n = int(n * step)
            if n > max_n:
                stop = f"search cap N = {max_n}"
                break
            if n < max(2, case.problem.n // 16):  # downwards: at most 4 halvings
                stop = f"nothing fits down to N = {n * 2}"
                break
            probe = Case(case.family, case.impl, replace(case.problem, n=n), mode="reach",
                         part="search")
            record = self.run_case(probe, budget_bytes=budget_bytes, time_limit_s=time_limit_s)
            runs.append(record)
            if record["status"] == "OK":
                largest = n
                if not fits:
                    break
            else:
                stop = f"{record['status']} at N = {n}"
                if fits:
                    break
        summary = {"family": case.family, "impl": case.impl, "largest_n": largest,
                   "capped": stop is not None and stop.startswith("search cap"),
                   "stopped_by": stop, "budget_bytes": budget_bytes}
        return summary, runs


def annotate(record, family, impl):
    """Add the work: essential FLOP, the products the implementation runs, achieved GFLOP/s."""
    problem = Runner.case_of(record).problem
    essential = fam.essential_flop(family, problem)
    run = int(essential // family.essential_products * fam.products_run(family, impl))
    record.update(flop_essential=essential, products=fam.products_run(family, impl), flop_run=run)
    if record.get("status") == "OK" and record.get("median_s"):
        record["gflops"] = run / record["median_s"] / 1e9
    return record


def fastest_rate(record):
    """GFLOP/s of the work the record's fastest run did (the products it runs: fewer than the
    essential ones for the symmetric-Gram kernels) (None unless OK and timed)."""
    if record.get("status") != "OK" or record.get("mode") != "time":
        return None
    fastest = min(record.get("samples_s") or [record.get("median_s") or 0])
    work = record.get("flop_run") or record["flop_essential"]
    return work / fastest / 1e9 if fastest > 0 else None


def settle_floor(floor, records):
    """Make the floor the fastest rate observed in the run: the best warm rate of the kernels'
    product shapes, or, if an implementation's fastest run did the essential work faster than
    that (the product measurements caught a slow moment of the machine), that run's rate, and
    ``set_by`` names it; rates count the products each run does. Every OK timed record that runs
    at least the essential products then has time / floor >= 1 (median >= fastest run >= the
    floor's time); the symmetric-Gram kernels (2 of the 3 products' work on CPU) can go to 2/3."""
    if floor is None or floor.get("status") != "OK":
        return floor
    for record in records:
        rate = fastest_rate(record)
        if rate is not None and rate > floor["best_gflops"]:
            floor.update(best_gflops=rate, set_by=f"{record['family']} {record['impl']} "
                                                  f"N = {record['n']} (its fastest run)")
    return floor


def apply_floor(record, floor):
    """time / floor, the floor being the essential FLOP at the best measured matmul rate."""
    if floor is None or floor.get("status") != "OK" or not record.get("median_s") \
            or record.get("status") != "OK":
        return record
    floor_s = record["flop_essential"] / (floor["best_gflops"] * 1e9)
    record.update(floor_s=floor_s, time_over_floor=record["median_s"] / floor_s)
    return record
