"""Fused CPU losses against plain PyTorch on a busy CPU: quiet rounds and busy rounds (one
spinning process per core at the same priority, as DataLoader workers or a second job would be)
in one run, interleaved.

    python -m benchmarks.contended --out OUT_DIR [--n 8192] [--dim 256]
                                   [--losses clip_loss,info_nce] [--repeats 5] [--spinners K]
                                   [--impls fused,fused_parallel_host,torch]

Each (loss, implementation) runs forward+backward in float32 in its own process (started once,
idle between its steps) with torch's default thread count; "fused" is backend "cpu", "torch" is
the reference (plain PyTorch on the materialised logits), "fused_parallel_host" backend "cpu" with
its host passes on every thread (the serial_host_ops setting off: fastcontrast/_host_threads.py),
the baseline of that setting. Every round times each process once,
the order rotated, first quiet and then beside the spinners (started for the round and always
stopped). Per loss: the median of each (implementation, phase), the slowdown busy / quiet of
each implementation (its fair share is about 2x with one spinner per core), and the speed-up
torch / fused in each phase. The target: fused slowdown <= 1.1 x torch slowdown.
Writes contended.json and contended.csv (one row per timed step, with the 1-minute load average
read before it: on a shared machine the "quiet" rounds are only as quiet as that) into OUT_DIR.
"""
import argparse
import csv
import json
import os
import statistics
import sys
import time
from multiprocessing import get_context

if __package__ in (None, ""):  # run as a script: the checkout's fastcontrast.benchmarks
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._bootstrap import ensure_package

    ensure_package()

# implementation -> (backend, settings overridden in its process: fastcontrast/_config.py)
IMPLS = {"fused": ("cpu", {}), "fused_parallel_host": ("cpu", {"serial_host_ops": False}),
         "torch": ("reference", {})}
LOSSES = ("clip_loss", "info_nce", "nt_xent", "supcon")
TOLERANCE = 1.1  # fused slowdown / torch slowdown allowed under load


def _make_step(loss, backend, n, dim):
    """A zero-argument forward+backward step of ``loss`` on fixed random float32 inputs."""
    import torch
    import torch.nn.functional as F

    import fastcontrast as fc

    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)
    labels = torch.randint(0, 100, (n,), generator=gen)
    calls = {
        "clip_loss": lambda x, y: fc.clip_loss(F.normalize(x, dim=-1), F.normalize(y, dim=-1),
                                               100.0, backend=backend),
        "info_nce": lambda x, y: fc.info_nce(x, y, temperature=0.07, backend=backend),
        "nt_xent": lambda x, y: fc.nt_xent(x, y, temperature=0.5, backend=backend),
        "supcon": lambda x, y: fc.supcon(x, labels, temperature=0.1, backend=backend),
    }

    def step():
        x, y = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
        (calls[loss](x, y)).backward()

    return step


def _worker(conn, loss, impl, n, dim):
    """Times one step of implementation ``impl`` per message until it receives None; the first
    step is a warm-up."""
    from fastcontrast._config import override

    backend, settings = IMPLS[impl]
    with override(**settings):
        step = _make_step(loss, backend, n, dim)
        step()
        conn.send("ready")
        while conn.recv() is not None:
            t0 = time.perf_counter()
            step()
            conn.send(time.perf_counter() - t0)


def _spin():
    while True:
        pass


class BusyLoad:
    """``count`` spinning processes for the duration of a with-block, stopped on the way out
    whatever happens (terminated, then killed if they linger)."""

    def __init__(self, ctx, count):
        self.ctx, self.count, self.procs = ctx, count, []

    def __enter__(self):
        for _ in range(self.count):
            proc = self.ctx.Process(target=_spin, daemon=True)
            proc.start()
            self.procs.append(proc)
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        self.procs = []
        return False


def _summary(rows, losses):
    """Per loss: medians per (impl, phase), each implementation's slowdown busy / quiet, and
    for each one but torch its speed-up over torch per phase and the target check."""
    out = {}
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    fused = [impl for impl in impls if impl != "torch"]
    for loss in losses:
        med = {(impl, phase): statistics.median(r["seconds"] for r in rows
                                                if r["loss"] == loss and r["impl"] == impl
                                                and r["phase"] == phase)
               for impl in impls for phase in ("quiet", "busy")}
        slow = {impl: med[impl, "busy"] / med[impl, "quiet"] for impl in impls}
        out[loss] = {
            "median_s": {f"{impl}_{phase}": v for (impl, phase), v in med.items()},
            "slowdown": slow,
            "speedup": {impl: {phase: med["torch", phase] / med[impl, phase]
                               for phase in ("quiet", "busy")} for impl in fused},
            "slowdown_vs_torch": {impl: slow[impl] / slow["torch"] for impl in fused},
            "target_met": {impl: slow[impl] <= TOLERANCE * slow["torch"] for impl in fused},
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for contended.json / .csv")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--losses", default="clip_loss,info_nce")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default="fused,torch",
                        help=f"implementations, torch among them ({', '.join(IMPLS)})")
    parser.add_argument("--spinners", type=int, default=len(os.sched_getaffinity(0)),
                        help="busy processes in the busy rounds (default: one per core)")
    args = parser.parse_args(argv)
    losses = [name for name in args.losses.split(",") if name]
    unknown = sorted(set(losses) - set(LOSSES))
    if unknown:
        parser.error(f"unknown losses {unknown}; valid: {', '.join(LOSSES)}")
    impls = [name for name in args.impls.split(",") if name]
    if "torch" not in impls or set(impls) - set(IMPLS):
        parser.error(f"--impls must name torch and only {', '.join(IMPLS)}, got {args.impls}")
    os.makedirs(args.out, exist_ok=True)

    ctx = get_context("spawn")
    load_start = os.getloadavg()
    workers = {}
    try:
        for loss in losses:
            for impl in impls:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, loss, impl, args.n, args.dim),
                                   daemon=True)
                proc.start()
                workers[loss, impl] = (proc, parent)
        for _, conn in workers.values():
            conn.recv()  # warmed up
        rows = []
        keys = list(workers)
        for rep in range(args.repeats):
            for phase in ("quiet", "busy"):
                with BusyLoad(ctx, args.spinners if phase == "busy" else 0):
                    time.sleep(0.5)  # the spinners running, the scheduler settled
                    shift = rep % len(keys)
                    for key in keys[shift:] + keys[:shift]:
                        conn = workers[key][1]
                        load1 = os.getloadavg()[0]
                        conn.send("go")
                        rows.append({"loss": key[0], "impl": key[1], "phase": phase, "rep": rep,
                                     "seconds": conn.recv(), "load1": load1})
                        time.sleep(0.2)  # the last process's threads gone idle
    finally:
        for proc, conn in workers.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()

    import torch

    result = {"command": " ".join([os.path.basename(sys.executable), "-m",
                                   "benchmarks.contended"] + sys.argv[1:]),
              "n": args.n, "dim": args.dim, "dtype": "float32", "spinners": args.spinners,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
              "summary": _summary(rows, losses), "rows": rows}
    with open(os.path.join(args.out, "contended.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out, "contended.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["loss", "impl", "phase", "rep", "seconds",
                                               "load1"])
        writer.writeheader()
        writer.writerows(rows)
    quiet_load = [r["load1"] for r in rows if r["phase"] == "quiet"]
    print(f"load average (1 min): {load_start[0]:.2f} at the start, "
          f"{result['loadavg_end'][0]:.2f} at the end; quiet rounds median "
          f"{statistics.median(quiet_load):.2f} (a quiet machine shows ~0; the busy rounds add "
          f"{args.spinners} spinners)")
    for loss, s in result["summary"].items():
        m = s["median_s"]
        print(f"{loss}: torch {m['torch_quiet']:.3f} -> {m['torch_busy']:.3f} s "
              f"({s['slowdown']['torch']:.2f}x)")
        for impl, speedup in s["speedup"].items():
            print(f"  {impl}: {m[impl + '_quiet']:.3f} -> {m[impl + '_busy']:.3f} s "
                  f"({s['slowdown'][impl]:.2f}x); speed-up {speedup['quiet']:.2f}x quiet, "
                  f"{speedup['busy']:.2f}x busy; target "
                  f"{'met' if s['target_met'][impl] else 'MISSED'}")
    return result


if __name__ == "__main__":
    main()
