"""Measure SigLIP forward+backward on CPU in one run: time and peak memory of fastcontrast's
backends against OpenCLIP's SigLipLoss written out (materialised logits) and its chunked-autograd
variant. Writes siglip_targets.json and summary.md into --out.

    python benchmarks/siglip_targets.py --out OUT_DIR [--n 8192] [--dim 256] [--repeats 5]

Time: every implementation once per round, the order rotated from round to round, medians
(fastcontrast.cli.measure.time_interleaved). Memory: each implementation once more in a fresh
process, peak resident set during the step minus the resident set before it (gradients
included). The losses are checked to agree before anything is timed. The essential work is
6 N^2 D FLOP (logits, d image, d text); its rate is reported beside a torch.mm rate measured in
the same run on one row block of the problem (512 x N x D), the floor.
"""

import argparse
import json
import os
import time

import torch

import fastcontrast
from fastcontrast.cli.measure import (
    format_bytes,
    format_seconds,
    machine_info,
    paired_ratio,
    peak_extra_memory,
    summarize,
    time_interleaved,
)

try:
    from ._siglip_cases import (BIAS, SCALE, forward_backward, loss_function,
                                make_inputs, make_step, siglip_flop)
except ImportError:  # run as a script: this folder is on sys.path
    from _siglip_cases import (BIAS, SCALE, forward_backward, loss_function,
                               make_inputs, make_step, siglip_flop)

BASELINE = "materialised"


def _implementations():
    impls = ["fastcontrast[torch]", "materialised", "chunked autograd"]
    if "cpu" in fastcontrast.available_backends("cpu"):
        impls.insert(0, "fastcontrast[cpu]")
    return impls


def _mm_rate(n, d, repeats):
    """GFLOP/s of the best of `repeats` (512 x D) @ (D x N) products."""
    a, b = torch.randn(512, d), torch.randn(n, d)
    out = torch.empty(512, n)
    torch.mm(a, b.T, out=out)
    best = min(_timed(lambda: torch.mm(a, b.T, out=out)) for _ in range(repeats))
    return 2 * 512 * n * d / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(n, dim, repeats):
    impls = _implementations()
    inputs = make_inputs(n, dim)
    values = {impl: forward_backward(loss_function(impl), inputs) for impl in impls}
    spread = max(values.values()) - min(values.values())
    if spread > 1e-4 * abs(values[BASELINE]):
        raise SystemExit(f"implementations disagree on the loss: {values}")
    steps = {
        impl: (lambda fn=loss_function(impl), x=inputs: forward_backward(fn, x)) for impl in impls
    }
    samples = time_interleaved(steps, repeats=repeats)
    del inputs, steps
    flop = siglip_flop(n, dim)
    results = {}
    for impl in impls:
        memory = peak_extra_memory(make_step, impl, n, dim, warmup_args=(impl, 256, dim))
        stats = summarize(samples[impl])
        results[impl] = {
            **stats,
            "gflops_essential": flop / stats["median_s"] / 1e9,
            "peak_extra_bytes": memory.extra_bytes,
            "memory_method": memory.method,
            "loss": values[impl],
        }
    for impl in impls:
        results[impl]["speedup_vs_materialised_per_round"] = paired_ratio(
            samples[BASELINE], samples[impl]
        )
        results[impl]["memory_vs_materialised"] = results[impl]["peak_extra_bytes"] / max(
            1, results[BASELINE]["peak_extra_bytes"]
        )
    return {
        "machine": machine_info(),
        "n": n,
        "d": dim,
        "dtype": "fp32",
        "scale": SCALE,
        "bias": BIAS,
        "repeats": repeats,
        "essential_flop": flop,
        "mm_gflops_512xNxD": _mm_rate(n, dim, repeats=10),
        "implementations": results,
    }


def summary(record):
    lines = [
        f"# SigLIP forward+backward, CPU fp32, N = {record['n']}, D = {record['d']}",
        "",
        f"{record['machine']['cpu']}, {record['machine']['torch_threads']} threads, torch "
        f"{record['machine']['torch']}, {record['machine']['date']}; medians of "
        f"{record['repeats']} interleaved rounds; torch.mm on a 512 x N x D block: "
        f"{record['mm_gflops_512xNxD']:.0f} GFLOP/s.",
        "",
        "| implementation | time (median) | GFLOP/s (6 N^2 D) | speedup vs materialised "
        "(per round) | peak extra memory | memory vs materialised |",
        "|---|---|---|---|---|---|",
    ]
    for impl, r in record["implementations"].items():
        lines.append(
            f"| {impl} | {format_seconds(r['median_s'])} | {r['gflops_essential']:.0f} | "
            f"{r['speedup_vs_materialised_per_round']:.2f}x | "
            f"{format_bytes(r['peak_extra_bytes'])} | "
            f"{100 * r['memory_vs_materialised']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", required=True, help="folder for siglip_targets.json and summary.md"
    )
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    record = run(args.n, args.dim, args.repeats)
    with open(os.path.join(args.out, "siglip_targets.json"), "w") as f:
        json.dump(record, f, indent=2)
    text = summary(record)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
