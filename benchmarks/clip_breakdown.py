"""Where symmetric CLIP's extra time goes on CPU: clip_loss against the
one-directional info_nce, forward+backward, and the kernel ops of each alone, interleaved in one
run (medians of rounds, order rotated; paired ratios).

    python -m benchmarks.clip_breakdown --out OUT_DIR [--n 16384] [--dim 256] [--repeats 3]
                                        [--scale 14.29]

Steps: the two losses (fwd+bwd, backend "cpu"); masked_lse_forward with and without the column
lse; masked_lse_backward with and without the column term (need_dq and need_dkeys); the fused
one-directional masked_lse_forward_with_grad; and one N x N x D product (the GEMM unit: the
symmetric loss runs 4 of them, the one-directional 3, so 4/3 bounds clip / info_nce). --scale is
the logit scale 1/tau (default 1/0.07; CLIP's learnt scale ends at its clamp of 100).
Writes clip_breakdown.json and summary.md.
"""
import json
import os
import time

import torch

import fastcontrast
from fastcontrast.cli.measure import (machine_info, paired_ratio, problem_parser, summarize,
                                      time_interleaved)

OPS = torch.ops.fastcontrast
SCALE = 1 / 0.07  # the default logit scale


def _steps(n, dim, scale):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(n, dim, generator=gen), torch.randn(n, dim, generator=gen)
    qn, kn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
    alpha, beta = torch.full((n,), scale), torch.ones(n)
    row_lse, col_lse = OPS.masked_lse_forward(qn, kn, alpha, beta, None, None, False, 0, True,
                                              "cpu")
    grad = torch.full((n,), 0.5 / n)
    tile = torch.empty(n, 512)

    def loss_step(symmetric):
        def run():
            a, b = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
            fastcontrast.info_nce(a, b, temperature=1 / scale, symmetric=symmetric,
                                  backend="cpu").backward()
        return run

    def gemm():  # N x N x D in the kernels' strips of 512 queries
        for r0 in range(0, n, 512):
            torch.mm(kn, qn[r0:r0 + 512].T, out=tile[:, :min(512, n - r0)])

    return {
        "info_nce fwd+bwd": loss_step(False),
        "clip fwd+bwd": loss_step(True),
        "fwd row": lambda: OPS.masked_lse_forward(qn, kn, alpha, beta, None, None, False, 0,
                                                  False, "cpu"),
        "fwd row+col": lambda: OPS.masked_lse_forward(qn, kn, alpha, beta, None, None, False, 0,
                                                      True, "cpu"),
        "bwd row": lambda: OPS.masked_lse_backward(qn, kn, alpha, beta, row_lse, grad, None,
                                                   None, None, None, False, 0, True, True,
                                                   "cpu"),
        "bwd row+col": lambda: OPS.masked_lse_backward(qn, kn, alpha, beta, row_lse, grad,
                                                       col_lse, grad, None, None, False, 0,
                                                       True, True, "cpu"),
        "fused fwd+grad (one-directional)": lambda: OPS.masked_lse_forward_with_grad(
            qn, kn, alpha, beta, grad, None, None, None, False, 0, True, True, "cpu"),
        "gemm N x N x D": gemm,
    }


def main(argv=None):
    parser = problem_parser(__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=SCALE)
    args = parser.parse_args(argv)
    samples = time_interleaved(_steps(args.n, args.dim, args.scale), args.repeats)
    gemm = samples["gemm N x N x D"]
    record = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": machine_info(), "load_average": os.getloadavg(), "n": args.n,
              "dim": args.dim, "scale": args.scale, "repeats": args.repeats,
              "steps": {name: dict(summarize(s), vs_gemm=paired_ratio(s, gemm))
                        for name, s in samples.items()},
              "clip_vs_info_nce": paired_ratio(samples["clip fwd+bwd"],
                                               samples["info_nce fwd+bwd"])}
    lines = [f"# Symmetric CLIP breakdown, CPU (N = M = {args.n}, D = {args.dim}, fp32, "
             f"logit scale {args.scale:.4g})", "",
             f"{record['machine'].get('cpu')}, {record['machine'].get('torch_threads')} threads; "
             f"{record['date']}; {args.repeats} interleaved rounds; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in record['load_average'])}.", "",
             f"clip / info_nce (paired): {record['clip_vs_info_nce']:.3f}", "",
             "| step | median (s) | / one N x N x D GEMM (paired) |", "|---|---|---|"]
    lines += [f"| {name} | {s['median_s']:.3f} | {s['vs_gemm']:.2f} |"
              for name, s in record["steps"].items()]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "clip_breakdown.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
