"""GPU benchmark of the fused losses beside their peers (the steps of benchmarks/gpu_check.sh).

    python3 benchmarks/gpu_losses_bench.py PART OUT [--n 65536] [--dim 512] [--device cuda]

PART (each writes PART.json into OUT; `report` reads them):
  correctness  the Triton backend in bf16 against the torch backend in fp32 on the same
               bf16-rounded inputs, values and gradients (relative L2 error < 2e-2): info_nce
               (one-directional), clip_loss (symmetric), siglip_loss, nt_xent (N rows: N/2 pairs).
  speed        forward+backward median time (CUDA events: triton.testing.do_bench), TFLOP/s and
               peak extra memory of the same four losses in bf16, and of the peers on the same
               inputs: OpenCLIP's ClipLoss (materialised logits, bf16) and Inf-CL's cal_inf_loss
               (one call: one direction; two calls: symmetric; it computes in fp32), beside a
               bf16 torch.mm rate measured in the same run. Each peer's loss value is checked
               against the torch backend first; a peer that is not importable is skipped, with
               the reason in the json.
  memory       the largest batch at D for symmetric CLIP, loss memory only (the inputs, their
               gradients and what the loss allocates; no model): N doubles from --n while a
               forward+backward succeeds and the next one is predicted (4x the last) to fit the
               time budget; peers until they run out of memory. fastcontrast's memory is linear
               in N, so the json also gives the N at which its measured bytes per row would fill
               the free memory: labelled an extrapolation, not a measurement.
  report       report.md: GPU, date, and the tables of the three parts.

FLOPs counted per forward+backward: 8 N M D for every InfoNCE-family loss and SigLIP (the
scores in the forward pass, recomputed once in the backward pass, and the dq and dkeys
products: 2 N M D each). The kernels run more where they recompute (see kernels/infonce.py);
the count is fixed so that implementations compare on one scale.
--device cpu (with TRITON_INTERPRET=1) runs every part at a tiny size: a smoke test of this
script only, no figure from it means anything.
"""
import argparse
import importlib
import json
import os
import platform
import sys
import time

torch = None  # imported by main() for the parts that compute (the report reads json only)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 2e-2  # relative L2 error of bf16 against fp32
TEMPERATURE = 0.07
SIGLIP_SCALE, SIGLIP_BIAS = 10.0, -10.0


def _fastcontrast():
    """fastcontrast with its kernels (installed or on PYTHONPATH, as gpu_check.sh arranges)."""
    import fastcontrast
    import fastcontrast.kernels  # noqa: F401 (fails early where kernels/ is not mapped)

    return fastcontrast


# ---------------------------------------------------------------------------------------------
# The losses: each takes (a, b) leaves of shape (N, D) and returns the scalar loss
# ---------------------------------------------------------------------------------------------


def fastcontrast_losses(backend):
    fc = _fastcontrast()
    return {
        "info_nce": lambda a, b: fc.info_nce(a, b, temperature=TEMPERATURE, normalize=False,
                                             backend=backend),
        "clip_symmetric": lambda a, b: fc.clip_loss(a, b, 1.0 / TEMPERATURE, backend=backend),
        "siglip": lambda a, b: fc.siglip_loss(a, b, SIGLIP_SCALE, SIGLIP_BIAS, backend=backend),
        # N rows = 2 views of N/2 samples: the views are a's halves.
        "nt_xent": lambda a, b: fc.nt_xent(a[: a.shape[0] // 2], a[a.shape[0] // 2:],
                                           temperature=TEMPERATURE, normalize=False,
                                           backend=backend),
    }


def peer_losses(device):
    """{name: loss or the reason it is skipped}: OpenCLIP's ClipLoss, Inf-CL one and two calls."""
    peers = {}
    sys.path.insert(0, ROOT)
    try:
        from benchmarks.peers import load_peer
    finally:
        sys.path.pop(0)
    clip_cls, reason = load_peer("open_clip ClipLoss")
    if clip_cls is None:
        peers["open_clip ClipLoss"] = reason
    else:
        clip = clip_cls()
        peers["open_clip ClipLoss"] = lambda a, b: clip(a, b, 1.0 / TEMPERATURE)
    try:
        inf_cl = importlib.import_module("inf_cl")
    except ImportError as error:
        reason = (f"inf_cl is not importable ({error}): build its wheel into wheels/ as "
                  "benchmarks/gpu_check.sh says")
        peers["inf_cl one direction"] = peers["inf_cl symmetric (2 calls)"] = reason
        return peers
    if device != "cuda":
        reason = "Inf-CL runs on CUDA only (its host functions assert q.is_cuda)"
        peers["inf_cl one direction"] = peers["inf_cl symmetric (2 calls)"] = reason
        return peers

    def scale(a):
        return torch.tensor(1.0 / TEMPERATURE, device=a.device)

    # Inf-CL's head_dim splits D into heads whose dot products add up: D itself where D <= 256.
    def head(a):
        return min(a.shape[1], 256)

    peers["inf_cl one direction"] = lambda a, b: inf_cl.cal_inf_loss(a, b, scale=scale(a),
                                                                     head_dim=head(a))
    peers["inf_cl symmetric (2 calls)"] = lambda a, b: 0.5 * (
        inf_cl.cal_inf_loss(a, b, scale=scale(a), head_dim=head(a))
        + inf_cl.cal_inf_loss(b, a, scale=scale(a), head_dim=head(a)))
    return peers


# The torch-backend loss each peer computes (for the value check).
PEER_REFERENCE = {"open_clip ClipLoss": "clip_symmetric", "inf_cl one direction": "info_nce",
                  "inf_cl symmetric (2 calls)": "clip_symmetric"}


def make_inputs(n, d, device, seed):
    """L2-normalised (image, text) pairs, correlated as after training (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
    noise = torch.randn(n, d, device=device, generator=gen)
    b = torch.nn.functional.normalize(a + noise / d**0.5, dim=1)  # cos(a_i, b_i) ~ 0.7
    return a, b


def loss_and_grads(fn, a, b, dtype):
    a = a.detach().to(dtype).requires_grad_()
    b = b.detach().to(dtype).requires_grad_()
    loss = fn(a, b)
    da, db = torch.autograd.grad(loss, [a, b], allow_unused=True)
    return loss.detach(), da, db


def relative_error(got, ref):
    if got is None or ref is None:
        return None
    return float((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def _siglip_check():
    """benchmarks/gpu_siglip_check.py (this script's folder is sys.path[0]): its timing helpers."""
    return importlib.import_module("gpu_siglip_check")


def median_ms(step, device, rep_ms):
    """Median milliseconds of step(): triton.testing.do_bench on CUDA, a few host-timed runs on
    the CPU."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(step, warmup=max(1, rep_ms // 10), rep=rep_ms,
                                       return_mode="median")
    return _siglip_check().median_ms(step, device, 3)


def peak_extra_gib(step, device):
    """Runs step(); the peak memory it allocates beyond what was allocated before (GiB; None on
    the CPU)."""
    if device != "cuda":
        step()
        return None
    return _siglip_check().peak_extra_mib(step, device) / 1024


def fwd_bwd(fn, a, b):
    """One forward+backward of fn on fresh leaves (a, b already in the timed dtype)."""
    def step():
        x = a.detach().requires_grad_()
        y = b.detach().requires_grad_()
        fn(x, y).backward()
    return step


def matmul_tflops(device):
    n = 8192 if device == "cuda" else 256
    x = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    y = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    return 2 * n**3 / median_ms(lambda: x @ y, device, 200) / 1e9


# ---------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------


def part_correctness(args):
    a, b = make_inputs(args.n, args.dim, args.device, seed=1)
    a, b = a.bfloat16(), b.bfloat16()
    fast = fastcontrast_losses("triton")
    ref = fastcontrast_losses("torch")
    cases = {}
    for name in fast:
        want = loss_and_grads(ref[name], a.float(), b.float(), torch.float32)
        got = loss_and_grads(fast[name], a, b, torch.bfloat16)
        errors = {k: relative_error(g, w) for k, g, w in zip(("loss", "da", "db"), got, want)}
        errors = {k: e for k, e in errors.items() if e is not None}
        finite = all(torch.isfinite(t).all() for t in got if t is not None)
        cases[name] = {"relative_error_vs_torch_fp32": errors, "finite": bool(finite),
                       "passed": bool(finite and all(e < TOLERANCE for e in errors.values()))}
        print(name, json.dumps(cases[name]), flush=True)
        del want, got
    return {"tolerance": TOLERANCE, "cases": cases}, all(c["passed"] for c in cases.values())


def part_speed(args):
    n, d, device = args.n, args.dim, args.device
    a, b = make_inputs(n, d, device, seed=2)
    a, b = a.bfloat16(), b.bfloat16()
    flops = 8 * n * n * d
    result = {"bf16_mm_tflops": matmul_tflops(device), "flops_counted": "8 N M D", "cases": {}}
    print("bf16 mm TFLOP/s", round(result["bf16_mm_tflops"], 1), flush=True)
    ref = fastcontrast_losses("torch")
    ref_values = {}

    def reference_value(name):
        if name not in ref_values:
            with torch.no_grad():
                ref_values[name] = float(ref[name](a.float(), b.float()))
        return ref_values[name]

    impls = [("fastcontrast " + k, f) for k, f in fastcontrast_losses("triton").items()]
    impls += list(peer_losses(device).items())
    for name, fn in impls:
        if isinstance(fn, str):
            result["cases"][name] = {"skipped": fn}
            print(name, "SKIPPED:", fn, flush=True)
            continue
        entry = {}
        try:
            if name in PEER_REFERENCE:
                with torch.no_grad():
                    value = float(fn(a, b))
                want = reference_value(PEER_REFERENCE[name])
                entry["value_rel_error_vs_torch_fp32"] = abs(value - want) / abs(want)
            step = fwd_bwd(fn, a, b)
            entry["fwd_bwd_ms_median"] = median_ms(step, device, args.rep_ms)
            entry["tflops"] = flops / entry["fwd_bwd_ms_median"] / 1e9
            entry["fraction_of_bf16_mm"] = entry["tflops"] / result["bf16_mm_tflops"]
            entry["peak_extra_gib"] = peak_extra_gib(step, device)
        except torch.cuda.OutOfMemoryError as error:
            entry = {"failed": f"out of memory: {str(error)[:200]}"}
        result["cases"][name] = entry
        print(name, json.dumps(entry), flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    cases = result["cases"]
    ours = cases["fastcontrast clip_symmetric"].get("fwd_bwd_ms_median")
    theirs = cases["inf_cl symmetric (2 calls)"].get("fwd_bwd_ms_median")
    if ours and theirs:
        result["symmetric_speedup_vs_inf_cl"] = theirs / ours
    return result, True


def part_memory(args):
    device, d = args.device, args.dim
    free = torch.cuda.mem_get_info()[0] if device == "cuda" else None
    impls = {"fastcontrast clip_symmetric": fastcontrast_losses("triton")["clip_symmetric"]}
    impls.update(peer_losses(device))
    impls.pop("inf_cl one direction")  # symmetric CLIP only
    result = {"d": d, "dtype": "bfloat16", "free_bytes_at_start": free, "cases": {}}
    runnable = [name for name, fn in impls.items() if not isinstance(fn, str)]
    for name, fn in impls.items():
        if isinstance(fn, str):
            result["cases"][name] = {"skipped": fn}
            continue
        deadline = time.monotonic() + args.budget_s / len(runnable)  # an equal share each
        runs, n, last_s, stop = [], args.n, None, None
        while True:
            if last_s is not None and time.monotonic() + 4 * last_s > deadline:
                stop = "time budget (the next doubling is predicted to take 4x the last run)"
                break
            if device != "cuda" and n > 4 * args.n:
                stop = "CPU smoke run: three sizes only"
                break
            if device == "cuda":
                torch.cuda.empty_cache()
            try:
                a, b = (t.bfloat16() for t in make_inputs(n, d, device, seed=3))
                t0 = time.perf_counter()
                peak = peak_extra_gib(fwd_bwd(fn, a, b), device)
                last_s = time.perf_counter() - t0
                inputs = 2 * n * d * 2 / 2**30
                runs.append({"n": n, "seconds": last_s, "peak_extra_gib": peak,
                             "inputs_gib": inputs})
                print(name, json.dumps(runs[-1]), flush=True)
                del a, b
            except torch.cuda.OutOfMemoryError:
                stop = f"out of memory at N = {n}"
                break
            n *= 2
        entry = {"runs": runs, "stopped_by": stop,
                 "largest_n_run": runs[-1]["n"] if runs else None}
        if runs and runs[-1]["peak_extra_gib"] is not None and name.startswith("fastcontrast"):
            last = runs[-1]
            per_row = (last["peak_extra_gib"] + last["inputs_gib"]) * 2**30 / last["n"]
            entry["bytes_per_row_at_largest_run"] = per_row
            entry["extrapolated_max_n_linear"] = int(free / per_row)
        result["cases"][name] = entry
    return result, True


def _table(rows, columns):
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _fmt(x, digits=3):
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _targets(parts):
    """The issue's GPU targets for symmetric CLIP at N = M = 65536, D = 512, met or not."""
    speed = parts.get("speed", {}).get("cases", {}).get("fastcontrast clip_symmetric", {})
    runs = (parts.get("memory", {}).get("cases", {}).get("fastcontrast clip_symmetric", {})
            .get("runs", []))
    growth = [b["peak_extra_gib"] / a["peak_extra_gib"] for a, b in zip(runs, runs[1:])
              if a["peak_extra_gib"] and b["peak_extra_gib"] is not None]
    fast = parts.get("memory", {}).get("cases", {}).get("fastcontrast clip_symmetric", {})
    rows = [
        ["fwd+bwd >= 2x faster than Inf-CL's two calls",
         _fmt(parts.get("speed", {}).get("symmetric_speedup_vs_inf_cl")), ">= 2"],
        ["rate counted on 8 N M D, of the bf16 mm rate", _fmt(speed.get("fraction_of_bf16_mm")),
         ">= 0.55"],
        ["loss memory growth per doubling of N", ", ".join(_fmt(g, 2) for g in growth) or "-",
         "~2 (O(N + M))"],
        ["largest batch at D = 512 (run / linear extrapolation)",
         f"{_fmt(fast.get('largest_n_run'))} / {_fmt(fast.get('extrapolated_max_n_linear'))}",
         ">= 4194304"],
    ]
    return ["## Targets (symmetric CLIP)", "", _table(rows, ["target", "measured", "wanted"]), ""]


def part_report(args):
    parts = {}
    for part in ("environment", "correctness", "speed", "memory"):
        path = os.path.join(args.out, f"{part}.json")
        if os.path.exists(path):
            with open(path) as f:
                parts[part] = json.load(f)
    env = parts.get("environment", {})
    lines = [f"# GPU check: {env.get('gpu', 'no GPU')}, {env.get('date', '-')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, N = M = {args.n}, "
             f"D = {args.dim}, bf16.", ""]
    if "correctness" in parts:
        c = parts["correctness"]
        lines += ["## Correctness (Triton bf16 vs torch backend fp32, relative L2 error)", "",
                  _table([[k, _fmt(v["relative_error_vs_torch_fp32"].get("loss")),
                           _fmt(v["relative_error_vs_torch_fp32"].get("da")),
                           _fmt(v["relative_error_vs_torch_fp32"].get("db")),
                           "yes" if v["passed"] else "NO"] for k, v in c["cases"].items()],
                         ["loss", "value", "grad a", "grad b", f"< {c['tolerance']}"]), ""]
    if "speed" in parts:
        s = parts["speed"]
        lines += [f"## Forward+backward (bf16 mm: {s['bf16_mm_tflops']:.0f} TFLOP/s; "
                  f"FLOPs counted {s['flops_counted']})", ""]
        rows = []
        for k, v in s["cases"].items():
            if "skipped" in v or "failed" in v:
                rows.append([k, "skipped: " + v.get("skipped", v.get("failed", "")), "-", "-",
                             "-"])
                continue
            rows.append([k, _fmt(v["fwd_bwd_ms_median"]), _fmt(v["tflops"]),
                         _fmt(v["fraction_of_bf16_mm"], 2), _fmt(v["peak_extra_gib"])])
        lines += [_table(rows, ["implementation", "ms (median)", "TFLOP/s", "of bf16 mm",
                                "peak extra GiB"]), ""]
        if "symmetric_speedup_vs_inf_cl" in s:
            lines += [f"Symmetric: fastcontrast {s['symmetric_speedup_vs_inf_cl']:.2f}x faster "
                      "than Inf-CL's two calls.", ""]
    if "memory" in parts:
        m = parts["memory"]
        lines += [f"## Largest batch at D = {m['d']} (loss memory only)", ""]
        rows = [[k, "skipped: " + v["skipped"], "-", "-"] if "skipped" in v else
                [k, _fmt(v["largest_n_run"]), str(v["stopped_by"]),
                 _fmt(v.get("extrapolated_max_n_linear"))] for k, v in m["cases"].items()]
        lines += [_table(rows, ["implementation", "largest N run", "stopped by",
                                "N filling free memory (linear extrapolation)"]), ""]
    lines += _targets(parts)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return None, True


def environment(args):
    import triton

    cuda = args.device == "cuda"
    return {"gpu": torch.cuda.get_device_name() if cuda else "none (CPU smoke run)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "triton": triton.__version__, "host": platform.node(),
            "n": args.n, "d": args.dim, "device": args.device}


PARTS = {"correctness": part_correctness, "speed": part_speed, "memory": part_memory,
         "report": part_report}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--rep-ms", type=int, default=300, help="do_bench repeat time per case")
    parser.add_argument("--budget-s", type=float, default=40.0,
                        help="memory part: time budget, shared equally by the implementations")
    args = parser.parse_args()
    if args.part == "report":
        part_report(args)
        return
    global torch
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu (and TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    with open(os.path.join(args.out, "environment.json"), "w") as f:
        json.dump(environment(args), f, indent=2)
    result, ok = PARTS[args.part](args)
    if result is not None:
        result.update(environment(args))
        with open(os.path.join(args.out, f"{args.part}.json"), "w") as f:
            json.dump(result, f, indent=2)
    if not ok:
        raise SystemExit(f"{args.part}: a check FAILED")


if __name__ == "__main__":
    main()
