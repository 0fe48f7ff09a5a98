"""CPU target of momentum_update, measured in one run: over ResNet-50's parameter list (161
tensors, 25,557,032 elements) fastcontrast must be at least as fast as torch._foreach_lerp_ (and
is compared with a Python loop of lerp_). Implementations run interleaved round by round; medians
and the median of per-round ratios are reported. Writes momentum_targets.json, .csv and .md.

    python benchmarks/momentum_targets.py --out DIR [--repeats 21] [--quick]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _momentum_cases import (RESNET50_NUM_ELEMENTS, RESNET50_NUM_TENSORS,  # noqa: E402
                             implementations, make_params, resnet50_param_shapes)
from report import write_csv, write_json  # noqa: E402

import fastcontrast.momentum as fm  # noqa: E402
from fastcontrast.cli.measure import (format_seconds, machine_info, paired_ratio,  # noqa: E402
                                       summarize, time_interleaved)
from fastcontrast.functional import available_backends  # noqa: E402

MOMENTUM = 0.999
BASELINE = "torch._foreach_lerp_"
FIELDS = ("case", "provider", "numel", "tensors", "target_dtype", "online_dtype", "median_s",
          "p20_s", "p80_s", "gbps", "ratio_vs_foreach")


def measure(case, shapes, target_dtype, online_dtype, repeats):
    """Records of every implementation on one case, interleaved."""
    targets, onlines = make_params(shapes, target_dtype, online_dtype=online_dtype)
    backends = [b for b in ("cpu", "torch") if b in available_backends("cpu")] + ["auto"]
    steps = implementations(targets, onlines, MOMENTUM, backends)
    if target_dtype != online_dtype:  # foreach needs one dtype: cast the online tensors first
        weight = 1.0 - MOMENTUM
        steps[BASELINE] = lambda: torch._foreach_lerp_(
            targets, [o.to(target_dtype) for o in onlines], weight)
        steps.pop("python_loop_lerp_")
    samples = time_interleaved(steps, repeats=repeats, warmup=2)
    numel = sum(t.numel() for t in targets)
    moved = numel * (2 * targets[0].element_size() + onlines[0].element_size())
    records = []
    for name, seconds in samples.items():
        stats = summarize(seconds)
        records.append({
            "case": case, "provider": name, "numel": numel, "tensors": len(targets),
            "target_dtype": str(target_dtype).replace("torch.", ""),
            "online_dtype": str(online_dtype).replace("torch.", ""), **stats,
            "gbps": moved / stats["median_s"] / 1e9,
            "ratio_vs_foreach": paired_ratio(seconds, samples[BASELINE])})
    return records


def run(repeats, quick):
    shapes = resnet50_param_shapes()
    if quick:
        shapes = shapes[:20]
    else:
        assert len(shapes) == RESNET50_NUM_TENSORS
    cases = [("resnet50 fp32", torch.float32, torch.float32),
             ("resnet50 fp32 target, bf16 online", torch.float32, torch.bfloat16)]
    records = []
    for case, target_dtype, online_dtype in cases:
        records += measure(case, shapes, target_dtype, online_dtype, repeats)
    auto = fm.resolve_backend("auto", "cpu")
    main = {r["provider"]: r for r in records if r["case"] == "resnet50 fp32"}
    fused = main["fastcontrast[auto]"]
    targets = [{
        "check": f"fastcontrast (auto = {auto!r}) at least as fast as {BASELINE} (fp32 ResNet-50)",
        "value": fused["ratio_vs_foreach"], "target": "<= 1.0",
        "met": fused["ratio_vs_foreach"] <= 1.0}]
    return {"machine": machine_info(),
            "config": {"momentum": MOMENTUM, "repeats": repeats, "quick": quick,
                       "shapes": "torchvision resnet50 parameters" if not quick else "first 20",
                       "expected_numel": RESNET50_NUM_ELEMENTS, "auto_backend": auto},
            "records": records, "targets": targets}


def write_outputs(out, result):
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "momentum_targets.json"), result, indent=2)
    m = result["machine"]
    context = {"cpu": m["cpu"], "threads": m["torch_threads"], "torch": m["torch"],
               "date": m["date"]}
    write_csv(os.path.join(out, "momentum_targets.csv"),
              [{**record, **context} for record in result["records"]],
              FIELDS + tuple(context))
    lines = [f"# momentum_update targets ({m['cpu']}, {m['torch_threads']} threads, torch "
             f"{m['torch']}, {m['date']})", "",
             f"m = {MOMENTUM}; medians of {result['config']['repeats']} interleaved rounds; "
             "ratio = median over rounds of time / time of torch._foreach_lerp_ in the same "
             "round; GB/s counts read target + read online + write target.", "",
             "| case | provider | median | p20 - p80 | GB/s | ratio vs foreach |",
             "|---|---|---|---|---|---|"]
    for r in result["records"]:
        lines.append(f"| {r['case']} | {r['provider']} | {format_seconds(r['median_s'])} | "
                     f"{format_seconds(r['p20_s'])} - {format_seconds(r['p80_s'])} | "
                     f"{r['gbps']:.1f} | {r['ratio_vs_foreach']:.2f} |")
    lines += ["", "| target | value | required | met |", "|---|---|---|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['check']} | {t['value']:.2f} | {t['target']} | "
                     f"{'yes' if t['met'] else 'NO'} |")
    with open(os.path.join(out, "momentum_targets.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder (JSON, CSV, markdown)")
    p.add_argument("--repeats", type=int, default=21, help="interleaved timed rounds")
    p.add_argument("--quick", action="store_true", help="20 tensors, a smoke test of the script")
    args = p.parse_args(argv)
    print(write_outputs(args.out, run(args.repeats, args.quick)))


if __name__ == "__main__":
    main()
