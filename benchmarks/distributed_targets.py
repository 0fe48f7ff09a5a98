"""``fastcontrast bench --suite distributed``: the distributed CLIP loss on W gloo processes of
this machine (127.0.0.1, one torch thread each) against OpenCLIP's
``ClipLoss(local_loss=True, gather_with_grad=True)``, and gradient caching against the plain
step. Each process is benchmarks/_distributed_worker.py; this file starts them, checks and
combines what they measured, and writes distributed_targets.json / .csv and summary.md.

Per implementation (ring, gather, open_clip), per rank, at global batch N (N / W rows a rank):
    peak extra memory   VmHWM-reset peak RSS of one forward+backward minus RSS before it
                        (worker.MemoryProbe), the inputs excluded; the max over ranks
    bytes sent          per rank per step: every torch.distributed call of the step counted at
                        what its bandwidth-optimal algorithm sends from one rank (ring
                        all-gather (W-1)|x|, ring all-reduce 2(W-1)/W |x|, reduce-scatter
                        (W-1)|out|, p2p sends |x|: _distributed_worker.COSTS); the max over ranks
    time                fwd+bwd, ``rounds`` interleaved rounds, a barrier before every step;
                        per round the slowest rank; the median over rounds
    key memory          (ring, gather) the memory a rank holds that grows with D, less its own
                        inputs' gradients: K(D) = 2 (peak(D) - peak(D/2)) - 2 (N/W) D 4 bytes.
                        peak = A + B D (score tiles, LSEs and the labels do not depend on D at
                        these sizes), so 2 (peak(D) - peak(D/2)) = B D: the key blocks (gathered
                        or travelling), their gradient accumulators and D-sized temporaries
The loss is checked first: the mean over ranks of the returned losses against fastcontrast's
float64 reference on the concatenated batch (runner.reference_value).

    python -m fastcontrast bench --suite distributed [--out DIR]
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

from fastcontrast.cli.measure import format_bytes, format_seconds, machine_info, paired_ratio

from . import families as fam
from .report import print_target_tables, write_target_files
from .runner import reference_value
from .worker import check_loss

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_distributed_worker.py")
IMPLS = ("ring", "gather", "open_clip")
# A fixed mmap threshold (glibc's grows up to 32 MiB after frees): every allocation of 64 KiB or
# more is mapped on malloc and unmapped on free, so a measured peak counts its own pages, not the
# heap left resident by an earlier measurement in the same process.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
TITLE = "fastcontrast bench --suite distributed"
NOTES = (
    "peak extra memory: per rank, VmHWM-reset peak RSS of one forward+backward minus the RSS "
    "before it (inputs excluded, the input gradients included); the max over ranks",
    "bytes sent: per rank per step, each torch.distributed call counted at what its "
    "bandwidth-optimal algorithm sends from one rank: all-gather (W-1)|x|, all-reduce "
    "2(W-1)/W |x|, reduce-scatter (W-1)|out|, all-to-all / scatter the parts for other ranks, "
    "point-to-point sends |x|",
    "time: forward+backward, rounds interleaved (order rotated), a barrier before each step; "
    "per round the slowest rank, the median over rounds; speed-ups are the median of per-round "
    "ratios",
    "key memory K(D) = 2 (peak(D) - peak(D/2)) - 2 (N/W) D 4 bytes: the part of a rank's peak "
    "that grows with D (key blocks held, gathered or travelling, their gradient accumulators, "
    "D-sized temporaries), less the two input gradients every implementation returns",
    "workers run with glibc's mmap threshold fixed at 64 KiB (MALLOC_ENV), so a peak does "
    "not depend on heap pages an earlier measurement left resident",
    "the loss is checked first: mean over ranks of the returned losses against fastcontrast's "
    "float64 reference on the concatenated batch",
)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(specs, deadline_s, threads=1):
    """Run one worker process per spec at once; wait at most ``deadline_s``; kill what is still
    running; return the result dicts (raises RuntimeError with the logs if one is missing)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "GLOO_SOCKET_IFNAME": "lo", **MALLOC_ENV}
    with tempfile.TemporaryDirectory(prefix="fastcontrast-dist-") as tmp:
        procs = []
        for i, spec in enumerate(specs):
            spec = {**spec, "result_path": os.path.join(tmp, f"result{i}.json")}
            log = open(os.path.join(tmp, f"log{i}.txt"), "w+")
            proc = subprocess.Popen([sys.executable, WORKER], stdin=subprocess.PIPE, stdout=log,
                                    stderr=subprocess.STDOUT, text=True, env=env,
                                    start_new_session=True)
            proc.stdin.write(json.dumps(spec))
            proc.stdin.close()
            procs.append((proc, log, spec["result_path"]))
        end = time.monotonic() + deadline_s
        try:
            for proc, _, _ in procs:
                try:
                    proc.wait(timeout=max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    break
        finally:
            for proc, _, _ in procs:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        results, problems = [], []
        for i, (proc, log, path) in enumerate(procs):
            log.seek(0)
            tail = " | ".join(log.read().strip().splitlines()[-4:])[-800:]
            log.close()
            if os.path.exists(path):
                with open(path) as f:
                    results.append(json.load(f))
            else:
                problems.append(f"process {i}: exit status {proc.returncode}: {tail}")
        if problems:
            raise RuntimeError("distributed benchmark workers failed: " + "; ".join(problems))
        return results


def key_memory(rank, impl, n, d, world):
    """K(D) of one rank (module docstring), in bytes."""
    full = rank["impls"][impl]["peak_extra_bytes"]
    half = rank["half_d"][impl]["peak_extra_bytes"]
    return 2 * (full - half) - 2 * (n // world) * d * 4


def combine(ranks, n, d, world, reference):
    """One record per implementation from the ranks' results (see the module docstring)."""
    records = []
    for impl in ranks[0]["impls"]:
        per = [r["impls"][impl] for r in ranks]
        rounds = [max(samples) for samples in zip(*(p["samples_s"] for p in per))]
        loss = float(np.mean([p["loss"] for p in per]))
        check = check_loss(loss, reference, "fp32")
        record = {"part": "losses", "case": f"clip W={world}", "backend": impl, "n": n, "m": n,
                  "d": d, "dtype": "fp32", "world": world, "rows_per_rank": n // world,
                  "loss": loss, "check": check, "status": "OK" if check["status"] != "WRONG"
                  else "WRONG", "round_s": rounds, "median_s": float(np.median(rounds)),
                  "p20_s": float(np.percentile(rounds, 20)),
                  "p80_s": float(np.percentile(rounds, 80)), "repeats": len(rounds),
                  "peak_extra_bytes": max(p["peak_extra_bytes"] for p in per),
                  "peak_extra_bytes_per_rank": [p["peak_extra_bytes"] for p in per],
                  "memory_method": per[0]["memory_method"],
                  "bytes_sent": max(p["bytes_sent"] for p in per),
                  "bytes_sent_per_rank": [p["bytes_sent"] for p in per],
                  "calls": per[0]["calls"]}
        if impl in ranks[0]["half_d"]:
            keys = [key_memory(r, impl, n, d, world) for r in ranks]
            record.update(key_bytes=max(keys), key_bytes_per_rank=keys,
                          peak_half_d_per_rank=[r["half_d"][impl]["peak_extra_bytes"]
                                                for r in ranks])
        records.append(record)
    return records


def _check(part, name, value, display, target, met):
    return {"part": part, "check": name, "value": value, "display": display, "target": target,
            "met": met}


def targets(records, gradcache, world, speedup=1.5, memory=0.05, cache=0.25):
    """The issue's checks on the combined records and the gradcache result."""
    by = {r["backend"]: r for r in records if r["part"] == "losses"}
    out = []
    for impl, r in by.items():
        out.append(_check("losses", f"{impl}: loss vs float64 reference", r["check"].get(
            "rel_err"), f"{r['loss']:.6g} (rel. err. {r['check'].get('rel_err', 0):.1e})",
            "matches", r["status"] == "OK"))
    peer = by.get("open_clip")
    for impl in ("ring", "gather"):
        r = by.get(impl)
        if r is None or peer is None:
            continue
        ratio = paired_ratio(peer["round_s"], r["round_s"])
        out.append(_check("losses", f"{impl}: speed-up vs OpenCLIP ClipLoss", ratio,
                          f"{ratio:.2f}x ({format_seconds(peer['median_s'])} / "
                          f"{format_seconds(r['median_s'])})", f">= {speedup}x",
                          ratio >= speedup))
        share = r["peak_extra_bytes"] / max(1, peer["peak_extra_bytes"])
        out.append(_check("losses", f"{impl}: per-rank peak extra memory vs OpenCLIP", share,
                          f"{100 * share:.1f}% ({format_bytes(r['peak_extra_bytes'])} / "
                          f"{format_bytes(peer['peak_extra_bytes'])})",
                          f"<= {100 * memory:.0f}%", share <= memory))
    if "ring" in by and "gather" in by and "key_bytes" in by["ring"]:
        ring, gather = by["ring"]["key_bytes"], by["gather"]["key_bytes"]
        ratio = ring / max(1, gather)
        out.append(_check("losses", "ring key memory per rank vs gather's", ratio,
                          f"{ratio:.2f}x ({format_bytes(ring)} / {format_bytes(gather)})",
                          f"<= 2/W = {2 / world:.2f}x", ratio <= 2 / world))
    if gradcache is not None:
        cached, plain = gradcache["runs"]["gradcache"], gradcache["runs"]["plain"]
        share = cached["peak_extra_bytes"] / max(1, plain["peak_extra_bytes"])
        out.append(_check("gradcache", f"gradcache peak vs plain step (batch {gradcache['n']}, "
                          f"chunk {gradcache['chunk']})", share,
                          f"{100 * share:.1f}% ({format_bytes(cached['peak_extra_bytes'])} / "
                          f"{format_bytes(plain['peak_extra_bytes'])})",
                          f"<= {100 * cache:.0f}%", share <= cache))
        same = gradcache["grad_rel_diff"] < 1e-4 and abs(
            cached["loss"] - plain["loss"]) <= 1e-5 * max(1.0, abs(plain["loss"]))
        out.append(_check("gradcache", "gradcache gradients = plain step's",
                          gradcache["grad_rel_diff"],
                          f"rel. diff. {gradcache['grad_rel_diff']:.1e}", "< 1e-4", same))
    return out


def gradcache_records(gradcache):
    return [{"part": "gradcache", "case": f"small CNN, batch {gradcache['n']}", "backend": name,
             "n": gradcache["n"], "m": gradcache["n"], "d": 128, "median_s": run["seconds"],
             "p20_s": None, "p80_s": None, "repeats": 1, "loss": run["loss"],
             "peak_extra_bytes": run["peak_extra_bytes"], "memory_method": run["memory_method"]}
            for name, run in gradcache["runs"].items()]


def per_rank_markdown(records):
    """The per-rank table (memory, key memory, bytes sent) the generic summary lacks."""
    lines = ["", "## Per rank (max over ranks)", "",
             "| implementation | peak extra memory | key memory K(D) | peak at D/2 | "
             "bytes sent / step | collective calls |", "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if r["part"] != "losses":
            continue
        key = format_bytes(r["key_bytes"]) if "key_bytes" in r else "-"
        half = format_bytes(max(r["peak_half_d_per_rank"])) if "key_bytes" in r else "-"
        calls = ", ".join(f"{k} x{v}" for k, v in sorted(r["calls"].items()))
        lines.append(f"| {r['backend']} | {format_bytes(r['peak_extra_bytes'])} | {key} | "
                     f"{half} | {format_bytes(r['bytes_sent'])} | {calls} |")
    return "\n".join(lines) + "\n"


def _load():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(n=16384, d=256, world=2, rounds=3, impls=IMPLS, gradcache_n=8192, chunk=512,
        image=32, timeout_s=120.0, deadline_s=900.0, progress=print):
    """Measure everything (module docstring); the result dict of a targets script."""
    if n % world or d % 2:
        raise ValueError(f"n must be a multiple of world and d even, got n={n}, world={world}, "
                         f"d={d}")
    started, load_start = time.monotonic(), _load()
    progress(f"reference: clip N = {n}, D = {d} in float64")
    reference = reference_value(fam.FAMILIES["clip"], fam.Problem(n=n, d=d))
    port = _free_port()
    progress(f"{world} gloo processes: {', '.join(impls)}; {rounds} rounds")
    specs = [{"mode": "losses", "world": world, "rank": rank, "port": port, "n": n, "d": d,
              "impls": list(impls), "rounds": rounds, "timeout_s": timeout_s}
             for rank in range(world)]
    ranks = launch(specs, deadline_s)
    records = combine(ranks, n, d, world, reference)
    gradcache = None
    if gradcache_n:
        progress(f"gradient caching: small CNN, batch {gradcache_n}, chunk {chunk}")
        gradcache = launch([{"mode": "gradcache", "n": gradcache_n, "chunk": chunk,
                             "image": image}], deadline_s, threads=os.cpu_count() or 1)[0]
        records += gradcache_records(gradcache)
    info = machine_info()
    config = {"world": world, "n": n, "d": d, "rounds": rounds, "threads_per_rank": 1,
              "gradcache_n": gradcache_n, "chunk": chunk, "image": image,
              "wall_s": round(time.monotonic() - started, 1),
              "load_average": {"start": load_start, "end": _load()}}
    notes = list(NOTES) + [
        "OpenCLIP's ClipLoss gathers image and text features with torch.distributed.nn's "
        "all_gather (its gloo backward: an all-to-all built from scatters) and materialises "
        "the (N/W) x N logits twice",
        "gradcache: two views of batch-size 3 x 32 x 32 images through one small CNN "
        "(_distributed_worker.cnn), clip_loss on the embeddings; gradcache_step with the chunk "
        "size against the plain step (whole batch with a graph), one measured run each, all "
        "cores"]
    return {"machine": info, "config": config, "records": records,
            "targets": targets(records, gradcache, world), "ranks": ranks,
            "gradcache": gradcache, "reference": reference, "notes": notes}


def write(result, out_dir):
    """distributed_targets.json / .csv and summary.md (with the per-rank table)."""
    paths = write_target_files(out_dir, result, TITLE, stem="distributed_targets")
    with open(paths[2], "a") as f:
        f.write(per_rank_markdown(result["records"]))
    return paths


def run_suite(out_dir=None, console=None, **options):
    """``fastcontrast bench --suite distributed``: run, print, write; the result dict."""
    from rich.console import Console

    console = console or Console(width=170)
    result = run(progress=lambda m: console.print(f"[dim]{m}[/]"), **options)
    out_dir = out_dir or os.path.join("bench-results", "distributed-" +
                                      result["machine"]["date"][:10])
    paths = write(result, out_dir)
    print_target_tables(console, result, TITLE)
    console.print(per_rank_markdown(result["records"]))
    console.print(f"wrote {', '.join(paths)} in {result['config']['wall_s']:.0f} s")
    return result
