"""``fastcontrast train METHOD``: train a reference method with its defaults and evaluate it.

    fastcontrast train simclr [--seconds S | --steps N] [--batch-size B] [--lr LR] [--seed S]
                              [--backend auto] [--no-baselines] [--plots DIR]
                              [--embedding pca|tsne] [--out DIR] [--threads T]
                              [--eval-at S] [--compare-backends] [--quiet]

Prints a progress bar and one line per epoch (loss, InfoNCE bound log(N) - L), then the linear
probe and kNN accuracy on frozen features of the held-out split next to the same encoder
untrained (and, unless --no-baselines, raw inputs and a supervised encoder of the same
architecture trained for the same time). ``--out DIR`` writes DIR/METHOD.json (settings, history,
accuracies, wall time, threads); ``--plots DIR`` the training curves and a 2-D projection of
the test features coloured by class (needs matplotlib; t-SNE also scikit-learn).
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
                   help="skip the raw-input probe and the supervised ceiling (the untrained "
                        "encoder is always reported)")
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


def _settings(args, defaults):
    seconds = args.seconds if args.seconds is not None else (
        None if args.steps is not None else defaults["seconds"])
    return {"seconds": seconds, "steps": args.steps,
            "batch_size": args.batch_size or defaults["batch_size"],
            "lr": args.lr or defaults["lr"], "weight_decay": defaults.get("weight_decay", 0.0),
            "seed": args.seed}


def run_train(args):
    """Handler of ``fastcontrast train``; returns the exit status."""
    import json
    import os
    import platform

    import torch

    from ..methods import method_module, trainer

    if args.threads:
        torch.set_num_threads(args.threads)
    module = method_module(args.method)
    cfg = _settings(args, module.DEFAULTS)
    train_set, test_set = trainer.datasets(module.DEFAULTS["data"])
    torch.manual_seed(args.seed)
    method = module.build(backend=args.backend)
    marks, checkpoints = sorted(args.eval_at), []

    def on_epoch(history, elapsed):
        if marks and elapsed >= marks[0]:
            while marks and elapsed >= marks[0]:
                marks.pop(0)
            checkpoints.append({"seconds": elapsed, "steps": history.steps,
                                **trainer.evaluate(method, train_set, test_set)})
            print(f"  probe at {elapsed:.0f} s (step {history.steps}): "
                  f"{100 * checkpoints[-1]['probe']:.1f}%")

    history = trainer.fit(method, train_set, progress=not args.quiet, on_epoch=on_epoch, **cfg)
    print(f"{args.method}: {history.steps} steps in {history.seconds:.1f} s on "
          f"{history.threads} thread(s), final epoch loss {history.epoch_loss[-1]:.4f}, "
          f"MI bound {history.epoch_mi_bound[-1]:.3f} nats")
    scores = trainer.evaluate(method, train_set, test_set)
    budget = {"seconds": cfg["seconds"], "steps": cfg["steps"]}
    if args.baselines:
        base = trainer.baselines(lambda: module.build(backend=args.backend), train_set,
                                 test_set, batch_size=cfg["batch_size"], lr=cfg["lr"],
                                 seed=args.seed, **budget)
    else:
        base = trainer.baselines(lambda: module.build(backend=args.backend), train_set,
                                 test_set, seed=args.seed, supervised=False, raw=False)
    comparison = None
    if args.compare_backends:
        comparison = _compare_backends(module, method, train_set, cfg, args.backend)
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
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        trainer.plot_history(history, os.path.join(args.plots, f"{args.method}-curves.png"))
        test_x, test_y = trainer.evaluation_inputs(test_set)
        from ..methods.evaluate import extract_features
        features = extract_features(trainer.FeatureModule(method), test_x)
        trainer.plot_embedding(features, test_y, os.path.join(
            args.plots, f"{args.method}-embedding-{args.embedding}.png"), args.embedding)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        record = {"method": args.method, "backend": args.backend, "settings": cfg,
                  "defaults": module.DEFAULTS, "scores": scores, "baselines": base,
                  "checkpoints": checkpoints, "backend_comparison": comparison,
                  "history": history.to_dict(), "torch": torch.__version__,
                  "machine": platform.machine(), "processor": platform.processor()}
        with open(os.path.join(args.out, f"{args.method}.json"), "w") as f:
            json.dump(record, f, indent=1)
    return 0


def _compare_backends(module, method, train_set, cfg, backend, curve_steps=20):
    """Step time with ``backend`` vs "reference" on the trained method, and the first
    ``curve_steps`` losses of two fresh runs from the same seed."""
    from ..methods import trainer

    times = {name: trainer.step_time(method, train_set, cfg["batch_size"], name)
             for name in (backend, "reference")}
    curve = trainer.same_curve(lambda b: module.build(backend=b), train_set, steps=curve_steps,
                               batch_size=cfg["batch_size"], lr=cfg["lr"], seed=cfg["seed"],
                               backends=(backend, "reference"))
    return {"step_seconds": times, "curve_steps": curve_steps, **curve}
