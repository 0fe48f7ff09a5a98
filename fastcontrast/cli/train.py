"""``fastcontrast train METHOD``: train a reference method with its defaults and evaluate it.

    fastcontrast train simclr [--seconds S | --steps N] [--batch-size B] [--lr LR] [--seed S]
                              [--backend auto] [--no-baselines] [--ceiling] [--plots DIR]
                              [--embedding pca|tsne] [--out DIR] [--threads T]
                              [--eval-at S] [--compare-backends] [--quiet]
                              [--set KEY=VALUE] [--nproc N] [--distributed-mode gather|ring]
                              [--device cpu|cuda]

Prints a progress bar and one line per epoch (loss, InfoNCE bound log(N) - L), then the linear
probe and kNN accuracy on frozen features of the held-out split next to the same encoder
untrained and a linear probe on the raw inputs (unless --no-baselines). ``--ceiling`` also
trains a supervised encoder of the same architecture for the same budget (the ceiling; it
doubles the wall time, so the default run does not). ``--out DIR`` writes DIR/METHOD.json
(settings, history, accuracies, wall time, threads); ``--plots DIR`` the training curves and a
2-D projection of the test features coloured by class (needs matplotlib; t-SNE also
scikit-learn).

``--nproc N`` trains data-parallel in N processes on this machine (``methods/launch.py``: gloo
on 127.0.0.1, a free port, torch threads split between them unless --threads), each with its
shard of every global batch (``--batch-size`` is the global batch), DistributedDataParallel and
the distributed loss (``--distributed-mode``); rank 0 alone prints, evaluates and writes. Under
torchrun (its environment variables set) the processes torchrun started are used instead.

``--device cuda`` trains on a GPU (``trainer.fit(device=)``: the method and every batch on it;
the encoder runs there for the probes, whose solvers take the features on the CPU); with
``--nproc N`` each process gets NCCL and its own GPU (rank r on cuda:r, DDP device_ids=[r]).
It needs a visible CUDA device, and N of them with --nproc N: checked before any process
starts. The baselines (untrained encoder, raw pixels, --ceiling) stay on the CPU.
"""
from .options import BACKENDS, positive


def add_train_parser(subparsers):
    """Register ``train`` on an argparse subparsers object; its handler is ``run_train``."""
    from ..methods import METHODS

    p = subparsers.add_parser(
        "train", help="train a reference contrastive method (simclr, moco, ...) and probe it",
        description="Train METHOD on its embedded data set with its default settings (at most "
                    "5 minutes on a 2-core CPU), log the loss and the InfoNCE bound per epoch, "
                    "and report the linear-probe and kNN accuracy on frozen features of the "
                    "held-out split against the same encoder untrained.")
    p.add_argument("method", choices=sorted(METHODS), help="the method to train")
    p.add_argument("--seconds", type=positive(float), default=None,
                   help="training time budget (default: the method's, <= 300)")
    p.add_argument("--steps", type=positive(int), default=None,
                   help="stop after this many steps (default: only the time budget)")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help="batch size (default: the method's)")
    p.add_argument("--lr", type=positive(float), default=None,
                   help="Adam learning rate (default: the method's)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="fastcontrast loss backend (default auto: the fused kernels)")
    p.add_argument("--threads", type=positive(int), default=None,
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the raw-input probe (the untrained encoder is always reported)")
    p.add_argument("--ceiling", action="store_true",
                   help="also train the supervised ceiling (the same encoder + a linear layer "
                        "with labels) for the same budget: doubles the wall time")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="KEY=VALUE", help="override one of the method's DEFAULTS (e.g. "
                                             "--set width=8 --set temperature=0.1; repeatable)")
    p.add_argument("--nproc", type=positive(int), default=1,
                   help="data-parallel processes on this machine (gloo; default 1); "
                        "--batch-size is then the global batch")
    p.add_argument("--distributed-mode", choices=("gather", "ring"), default="gather",
                   help="distributed loss with --nproc > 1 (default gather)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="train on the CPU (default) or a GPU; with --nproc N: NCCL, one GPU "
                        "per process")
    p.add_argument("--plots", default=None, metavar="DIR",
                   help="write METHOD-curves.png and METHOD-embedding.png into DIR")
    p.add_argument("--embedding", choices=("pca", "tsne"), default="pca",
                   help="2-D projection for the embedding plot (default pca)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write DIR/METHOD.json (history, accuracies, settings)")
    p.add_argument("--eval-at", type=positive(float), action="append", default=[],
                   metavar="S", help="also probe the features at the first epoch end past S "
                                     "seconds of training (repeatable; evaluation time is not "
                                     "counted)")
    p.add_argument("--compare-backends", action="store_true",
                   help="also time a training step with --backend vs the reference backend "
                        "(materialised logits) at the batch size, and train 20 steps with "
                        "each from the same seed (max loss difference)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run_train)
    return p


def _override(text):
    """KEY=VALUE -> (KEY, VALUE as a Python literal, else the string)."""
    import argparse
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return key.strip(), value


def _budget_shortfall(method, cfg, defaults, trained_s):
    """A note when the run trained for less than the method's default budget, whose accuracies
    the README quotes (a shorter run is expected to score lower); None otherwise."""
    default_s = defaults["seconds"]
    if cfg["seconds"] is not None and cfg["seconds"] >= default_s:
        return None
    if cfg["seconds"] is None and trained_s >= default_s:
        return None
    return (f"(trained for {trained_s:.0f} s, less than {method}'s default budget of "
            f"{default_s:g} s: the accuracies quoted in the README are for the default budget, "
            "and a shorter run scores lower)")


def _settings(args, defaults):
    seconds = args.seconds if args.seconds is not None else (
        None if args.steps is not None else defaults["seconds"])
    return {"seconds": seconds, "steps": args.steps,
            "batch_size": args.batch_size or defaults["batch_size"],
            "lr": args.lr or defaults["lr"], "weight_decay": defaults.get("weight_decay", 0.0),
            "seed": args.seed}


def run_train(args):
    """Handler of ``fastcontrast train``; returns the exit status."""
    import os

    from ..methods import launch

    device = getattr(args, "device", "cpu")
    if launch.launched_by_torchrun():
        launch.check_device(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                            names=("--device", "torchrun's --nproc-per-node"))
        return launch.run_in_torchrun(_rank_main, (args,), device=device)
    nproc = getattr(args, "nproc", 1)
    launch.check_device(device, nproc, names=("--device", "--nproc"))
    if nproc == 1:
        return _train_and_report(args)
    if args.compare_backends:
        raise ValueError("--compare-backends times single-process steps; drop --nproc")
    from ..methods import method_module

    # before any process starts (fit refuses it in every rank too)
    method = method_module(args.method).build(backend=args.backend,
                                              **dict(getattr(args, "overrides", [])))
    if not method.data_parallel:
        raise ValueError(f"--nproc {nproc}: {args.method} has no data-parallel loss (each "
                         f"process would train on its own shard's loss); methods with one: "
                         f"simclr, moco, cmc")
    threads = args.threads or max(1, (os.cpu_count() or 1) // nproc)
    statuses = launch.spawn(_rank_main, nproc, (args,), threads=threads, device=device)
    return max(statuses)


def _rank_main(rank, world_size, args):
    """One rank of ``--nproc`` (or torchrun): train its shard; rank 0 reports."""
    return _train_and_report(args, rank=rank)


def _train_and_report(args, rank=0):
    import json
    import os
    import platform

    import torch

    from ..methods import launch, method_module, plots, scoring, trainer

    device = launch.local_device(getattr(args, "device", "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    module = method_module(args.method)
    cfg = _settings(args, module.DEFAULTS)
    train_set, test_set = trainer.datasets(module.DEFAULTS["data"])
    torch.manual_seed(args.seed)
    overrides = dict(getattr(args, "overrides", []))
    method = module.build(backend=args.backend, **overrides)
    marks, checkpoints = sorted(args.eval_at), []

    def on_epoch(history, elapsed):
        if marks and elapsed >= marks[0]:
            while marks and elapsed >= marks[0]:
                marks.pop(0)
            checkpoints.append({"seconds": elapsed, "steps": history.steps,
                                **scoring.evaluate(method, train_set, test_set)})
            print(f"  probe at {elapsed:.0f} s (step {history.steps}): "
                  f"{100 * checkpoints[-1]['probe']:.1f}%")

    history = trainer.fit(method, train_set, progress=not args.quiet,
                          on_epoch=on_epoch if rank == 0 else None,
                          distributed_mode=getattr(args, "distributed_mode", "gather"),
                          device=device, **cfg)
    if rank != 0:
        return 0
    world = history.settings["world_size"]
    where = (f"{history.threads} thread(s)" if world == 1 else
             f"{world} processes x {history.threads} thread(s), "
             f"{history.settings['distributed_mode']} mode")
    if device.type == "cuda":
        where = f"{device} ({where})" if world == 1 else f"{world} GPUs ({where})"
    print(f"{args.method}: {history.steps} steps in {history.seconds:.1f} s on {where}, "
          f"final epoch loss {history.epoch_loss[-1]:.4f}, "
          f"MI bound {history.epoch_mi_bound[-1]:.3f} nats")
    method.distributed_mode = None  # evaluation below is local to rank 0
    scores = scoring.evaluate(method, train_set, test_set)
    budget = {"seconds": cfg["seconds"], "steps": cfg["steps"]}
    ceiling = getattr(args, "ceiling", False)
    base = scoring.baselines(lambda: module.build(backend=args.backend, **overrides),
                             train_set, test_set,
                             batch_size=cfg["batch_size"], lr=cfg["lr"], seed=args.seed,
                             supervised=ceiling, raw=args.baselines,
                             **(budget if ceiling else {}))
    comparison = None
    if args.compare_backends:
        comparison = _compare_backends(module, method, train_set, cfg, args.backend, device)
        print(f"step time at batch {cfg['batch_size']}: {args.backend} "
              f"{comparison['step_seconds'][args.backend]:.3f} s, reference "
              f"{comparison['step_seconds']['reference']:.3f} s; same-seed curves over "
              f"{comparison['curve_steps']} steps differ by at most "
              f"{comparison['max_abs_diff']:.2e}")
    rows = [(args.method, scores)] + [(name, base[name]) for name in
                                      ("untrained", "raw", "supervised") if name in base]
    print(f"{'features':<12} {'linear probe':>12} {'kNN':>8}")
    for name, row in rows:
        knn = f"{100 * row['knn']:7.1f}%" if "knn" in row else f"{'-':>8}"
        print(f"{name:<12} {100 * row['probe']:11.1f}% {knn}")
    shortfall = _budget_shortfall(args.method, cfg, module.DEFAULTS, history.seconds)
    if shortfall:
        print(shortfall)
    if not ceiling:
        print("(supervised ceiling not trained: add --ceiling; it doubles the wall time)")
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        plots.plot_history(history, os.path.join(args.plots, f"{args.method}-curves.png"))
        test_x, test_y = trainer.evaluation_inputs(test_set)
        from ..methods.evaluate import extract_features
        features = extract_features(scoring.FeatureModule(method), test_x)
        plots.plot_embedding(features, test_y, os.path.join(
            args.plots, f"{args.method}-embedding-{args.embedding}.png"), args.embedding)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        record = {"method": args.method, "backend": args.backend, "device": str(device),
                  "settings": cfg,
                  "defaults": module.DEFAULTS, "scores": scores, "baselines": base,
                  "checkpoints": checkpoints, "backend_comparison": comparison,
                  "history": history.to_dict(), "torch": torch.__version__,
                  "machine": platform.machine(), "processor": platform.processor()}
        with open(os.path.join(args.out, f"{args.method}.json"), "w") as f:
            json.dump(record, f, indent=1)
    return 0


def _compare_backends(module, method, train_set, cfg, backend, device, curve_steps=20):
    """Step time with ``backend`` vs "reference" on the trained method (on its device), and the
    first ``curve_steps`` losses of two fresh runs from the same seed on ``device``."""
    from ..methods import timing

    times = {name: timing.step_time(method, train_set, cfg["batch_size"], name)
             for name in (backend, "reference")}
    curve = timing.same_curve(lambda b: module.build(backend=b), train_set, steps=curve_steps,
                              batch_size=cfg["batch_size"], lr=cfg["lr"], seed=cfg["seed"],
                              backends=(backend, "reference"), device=device)
    return {"step_seconds": times, "curve_steps": curve_steps, **curve}
