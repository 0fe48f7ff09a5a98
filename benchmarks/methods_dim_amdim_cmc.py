"""Measure Deep InfoMax, AMDIM and CMC on cluttered digits and write one JSON per method (by
default into benchmarks/results/methods-dim-amdim-cmc-cpu-2core/, the recorded run).

    python benchmarks/methods_dim_amdim_cmc.py METHOD [--seconds S] [--threads T]
                                               [--baseline-seconds S] [--out DIR]

Trains ``build(METHOD)`` with its DEFAULTS for the DEFAULTS["seconds"] budget (``fit``), then
records: linear-probe and kNN accuracy of the frozen features (held-out split), the untrained
and raw-pixel baselines and a supervised encoder of the same architecture (``baselines``; the
supervised budget is ``--baseline-seconds``), the median step time with the fused losses and
with backend="reference" (and, for AMDIM, the unclipped variant that uses the fused loss), and
the first 10 steps' losses of both backends from the same seed."""
import argparse
import json
import os
import platform
import time

import torch

from fastcontrast.methods import method_module
from fastcontrast.methods import scoring, timing, trainer

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                       "methods-dim-amdim-cmc-cpu-2core")


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("method", choices=("dim", "amdim", "cmc"))
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--baseline-seconds", type=float, default=60.0)
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    module = method_module(args.method)
    settings = module.DEFAULTS
    seconds = args.seconds or settings["seconds"]
    batch, lr = settings["batch_size"], settings["lr"]
    train, test = trainer.datasets(settings["data"])
    result = {"method": args.method, "defaults": {k: (list(v) if isinstance(v, tuple) else v)
                                                  for k, v in settings.items()},
              "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
              "load_average_start": os.getloadavg(), "machine": platform.processor() or
              platform.machine(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    method = module.build()
    history = trainer.fit(method, train, seconds=seconds, batch_size=batch, lr=lr, seed=0,
                          progress=False)
    result.update(steps=history.steps, train_seconds=history.seconds,
                  epoch_loss=history.epoch_loss, epoch_mi_bound=history.epoch_mi_bound,
                  **scoring.evaluate(method, train, test))
    result["baselines"] = scoring.baselines(module.build, train, test,
                                            seconds=args.baseline_seconds, batch_size=batch,
                                            lr=lr)
    result["step_seconds"] = {b: timing.step_time(method, train, batch, b)
                              for b in ("auto", "reference")}
    if args.method == "amdim":
        unclipped = module.build(clip=None)
        result["step_seconds_unclipped"] = {b: timing.step_time(unclipped, train, batch, b)
                                            for b in ("auto", "reference")}
    options = {"clip": None} if args.method == "amdim" else {}
    result["same_curve"] = timing.same_curve(
        lambda backend: module.build(backend=backend, **options), train, steps=10,
        batch_size=batch, lr=lr)
    result["same_curve"]["options"] = options
    result["load_average_end"] = os.getloadavg()
    path = os.path.join(args.out, f"{args.method}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("method", "steps", "train_seconds", "probe", "knn",
                                             "step_seconds")}))


if __name__ == "__main__":
    main()
