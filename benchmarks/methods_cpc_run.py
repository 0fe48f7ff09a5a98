"""Measure CPC on SyntheticSpeakers and write OUT_DIR/cpc.json (the measurement behind
benchmarks/results/methods-cpc-cpu-2core/).

    python benchmarks/methods_cpc_run.py OUT_DIR [--threads T] [--seed S]

CPC trained with its DEFAULTS through the trainer, then evaluated (probe, kNN, per-step accuracy
and InfoNCE bound on held-out sequences), against the untrained network and raw inputs; step time
of the fused loss vs backend="reference"; the same-first-steps check."""
import argparse
import json
import math
import os
import platform
import statistics
import time

import torch

from fastcontrast.methods import cpc, scoring, timing, trainer
from fastcontrast.methods import evaluate as ev


def held_out_diagnostics(method, test_set, batch_size):
    """Mean per-step accuracy, loss and bound log(B L) - L_k over full batches of the test split
    (eval mode, no grad, batches in stored order, as many candidates per query as in training)."""
    x, _ = trainer.evaluation_inputs(test_set)
    sums = {}
    method.eval()
    with torch.no_grad():
        batches = [x[i:i + batch_size] for i in range(0, len(x) - batch_size + 1, batch_size)]
        for batch in batches:
            for key, value in method.loss(batch).items():
                sums[key] = sums.get(key, 0.0) + float(value) / len(batches)
    method.train()
    return sums


def loss_only_time(d, sequence_length, repeats):
    """Median seconds of the K fused info_nce calls of one CPC step (forward + backward) on
    random inputs of the default shapes, per backend: the contrastive part of the step alone."""
    import fastcontrast

    b, length, dim = d["batch_size"], sequence_length // 16, d["latent_dim"]
    keys = torch.randn(b * length, dim, requires_grad=True)
    queries = [torch.randn(b * (length - k), dim, requires_grad=True)
               for k in range(1, d["prediction_steps"] + 1)]
    row = (torch.arange(b) * length)[:, None]
    targets = [(row + torch.arange(k, length)).reshape(-1)
               for k in range(1, d["prediction_steps"] + 1)]
    result = {}
    for backend in ("auto", "reference", "auto", "reference"):
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            total = sum(fastcontrast.info_nce(q, keys, targets=t, temperature=d["temperature"],
                                              normalize=d["normalize"], backend=backend)
                        for q, t in zip(queries, targets))
            total.backward()
            times.append(time.perf_counter() - start)
        result[backend] = min(result.get(backend, math.inf), statistics.median(times[1:]))
    result["reference_over_fused"] = result["reference"] / result["auto"]
    return result


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = cpc.DEFAULTS
    train_set, test_set = trainer.datasets(d["data"])
    record = {"defaults": d, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "machine": platform.machine(), "processor": platform.processor(),
              "chance": 1 / train_set.n_speakers, "seed": args.seed}

    torch.manual_seed(args.seed)
    method = cpc.build()
    history = trainer.fit(method, train_set, seconds=d["seconds"], batch_size=d["batch_size"],
                          lr=d["lr"], seed=args.seed, progress=False)
    record["train"] = {"steps": history.steps, "wall_seconds": history.seconds,
                       "threads": history.threads, "epochs": len(history.epoch_loss),
                       "final_epoch_loss": history.epoch_loss[-1],
                       "final_epoch_mi_bound": history.epoch_mi_bound[-1],
                       "log_candidates": math.log(d["batch_size"] * train_set.length // 16)}
    last = history.epoch_end_step[-2] if len(history.epoch_end_step) > 1 else 0
    record["train"]["final_epoch_metrics"] = {
        key: statistics.fmean(values[last:]) for key, values in history.step_metrics.items()}
    start = time.perf_counter()
    record["scores"] = scoring.evaluate(method, train_set, test_set)
    record["held_out"] = held_out_diagnostics(method, test_set, d["batch_size"])
    record["eval_seconds"] = time.perf_counter() - start
    print("trained", record["train"]["steps"], "steps", record["scores"], flush=True)

    train_x, train_y = trainer.evaluation_inputs(train_set)
    test_x, test_y = trainer.evaluation_inputs(test_set)
    record["raw_input_probe"] = ev.raw_pixel_baseline(train_x, train_y, test_x, test_y)
    record["untrained"] = ev.untrained_baseline(
        lambda: scoring.FeatureModule(cpc.build()), train_x, train_y, test_x, test_y,
        seeds=(0, 1, 2))
    print("baselines", record["raw_input_probe"], record["untrained"], flush=True)

    times = {b: [timing.step_time(method, train_set, d["batch_size"], b, repeats=10)
                 for _ in range(2)] for b in ("auto", "reference")}
    record["step_seconds"] = {b: min(t) for b, t in times.items()}
    record["step_seconds"]["reference_over_fused"] = (record["step_seconds"]["reference"]
                                                      / record["step_seconds"]["auto"])
    record["loss_only_seconds"] = loss_only_time(d, train_set.length, repeats=10)
    print("step", record["step_seconds"], record["loss_only_seconds"], flush=True)

    record["same_curve"] = timing.same_curve(lambda backend: cpc.build(backend=backend),
                                             train_set, steps=20, batch_size=d["batch_size"],
                                             lr=d["lr"], seed=args.seed)
    print("same curve", record["same_curve"]["max_abs_diff"], flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "cpc.json"), "w") as f:
        json.dump(record, f, indent=1)


if __name__ == "__main__":
    main()
