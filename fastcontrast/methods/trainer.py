"""Training and evaluation of the reference methods through their common interface (``base.py``).

    method = fastcontrast.methods.build("simclr")
    train, test = datasets("digits")
    history = fit(method, train, seconds=180, batch_size=256, lr=1e-3, seed=0)
    scores = evaluate(method, train, test)              # {"probe": .., "knn": ..}
    floor_and_ceiling = baselines(lambda: build("simclr"), train, test, seconds=180, ...)
    plot_history(history, "curves.png"); plot_embedding(features, labels, "pca.png")

``fit`` runs epochs over a seeded permutation of the training set (the last incomplete batch
dropped), Adam by default, until the step count or the time budget is reached, and logs the
per-step loss and InfoNCE bound log(N) - L (the method's "mi_bound"), plus their epoch means.
With torch.distributed initialised (``fastcontrast train METHOD --nproc N``, or torchrun) it
trains data-parallel: see ``fit``. ``fit(..., device=)`` trains on that device: the method is
moved there and each batch (drawn on the CPU) follows it.
Evaluation is on frozen features of the fixed renderings (``dataset.evaluation_set()``, else the
stacked items): the linear probe and kNN are fitted on the training split and scored on the
test split.
"""
import copy
import math
import numbers
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import evaluate as ev
from .base import ContrastiveMethod

DATASETS = ("digits", "speakers")
EMBEDDINGS = ("pca", "tsne")


def _check_method(method):
    if not isinstance(method, ContrastiveMethod):
        raise TypeError(f"method must be a fastcontrast.methods.ContrastiveMethod, got "
                        f"{type(method).__name__}")


def _positive(name, value, kind=numbers.Real, optional=False):
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TypeError(f"{name} must be {'an int' if kind is numbers.Integral else 'a number'}, "
                        f"got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def datasets(name, **kwargs):
    """(train, test) splits of an embedded data set: "digits" (ClutteredDigits) or "speakers"
    (SyntheticSpeakers); ``kwargs`` go to both constructors."""
    from .data import ClutteredDigits, SyntheticSpeakers

    if name == "digits":
        return ClutteredDigits("train", **kwargs), ClutteredDigits("test", **kwargs)
    if name == "speakers":
        return (SyntheticSpeakers(split="train", **kwargs),
                SyntheticSpeakers(split="test", **kwargs))
    raise ValueError(f"data must be one of {DATASETS}, got {name!r}")


def evaluation_inputs(dataset):
    """(inputs, labels) the probes use: ``dataset.evaluation_set()`` (a fixed rendering) when the
    data set has one, else all its items stacked."""
    if callable(getattr(dataset, "evaluation_set", None)):
        return dataset.evaluation_set()
    items = [dataset[i] for i in range(len(dataset))]
    return (torch.stack([x for x, _ in items]),
            torch.stack([torch.as_tensor(y) for _, y in items]).long())


def training_inputs(dataset, indices, generator):
    """Freshly augmented single views with labels, for the supervised baseline: ``render``
    (images), ``generate`` (new sequences of the same classes) or the stored items."""
    labels = torch.stack([torch.as_tensor(dataset[int(i)][1]) for i in indices]).long()
    if callable(getattr(dataset, "render", None)):
        return dataset.render(indices, generator), labels
    if callable(getattr(dataset, "generate", None)):
        return dataset.generate(labels, generator), labels
    return torch.stack([dataset[int(i)][0] for i in indices]), labels


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class History:
    """What ``fit`` logged: per step (loss, InfoNCE bound, other diagnostics) and per epoch
    (means over the epoch's steps), with the run's settings and wall time."""

    step_loss: list = field(default_factory=list)
    step_mi_bound: list = field(default_factory=list)
    step_metrics: dict = field(default_factory=dict)
    epoch_loss: list = field(default_factory=list)
    epoch_mi_bound: list = field(default_factory=list)
    epoch_end_step: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    threads: int = 1
    settings: dict = field(default_factory=dict)

    def to_dict(self):
        return asdict(self)


class _Progress:
    """A rich progress bar over steps or seconds plus one line per epoch (silent if disabled)."""

    def __init__(self, enabled, total, unit):
        self.bar = None
        if not enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(),
                            TextColumn("{task.completed:.0f}/{task.total:.0f} " + unit),
                            TimeElapsedColumn(), TextColumn("{task.fields[status]}"))
        self.task = self.bar.add_task("train", total=total, status="")
        self.bar.start()

    def update(self, completed, status):
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, status=status)

    def epoch(self, line):
        if self.bar is not None:
            self.bar.console.print(line)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


def _batches(n, batch_size, generator):
    """Index batches of one epoch: a seeded permutation cut into full batches (one batch of all
    n items if n < batch_size)."""
    size = min(batch_size, n)
    order = torch.randperm(n, generator=generator)
    return [order[i:i + size] for i in range(0, n - size + 1, size)]


def fit(method, dataset, *, seconds=None, steps=None, batch_size, lr, weight_decay=0.0, seed=0,
        optimizer="adam", progress=True, on_epoch=None, distributed_mode="gather", group=None,
        device=None):
    """Train ``method`` on ``dataset`` for ``steps`` optimizer steps and/or ``seconds`` of wall
    time (whichever comes first; at least one is required) and return its ``History``.

    Each step: batch = method.views(dataset, indices, generator); out = method.loss(batch);
    out["loss"].backward(); optimizer step; method.after_step(). Deterministic for a seed:
    torch.manual_seed(seed) and one torch.Generator seeded with ``seed`` for the batches and
    views (with a step budget; a time budget stops after however many steps fit). ``optimizer``:
    "adam" (Adam) or "sgd" (SGD with momentum 0.9), both with ``weight_decay``.
    ``on_epoch(history, elapsed)`` is called after every epoch (e.g. to evaluate at a time
    mark); the time it takes is not counted in the budget nor in ``history.seconds``.
    ``device`` ("cpu", "cuda", "cuda:1" or a torch.device; None: where the method already is):
    ``method.to(device)`` (parameters and buffers: momentum encoders, queues) before the
    optimizer is built, and every batch from ``views`` (drawn on the CPU, so the same seed
    gives the same views on any device) is moved there before ``loss``.

    Data-parallel training (torch.distributed initialised, world size W > 1 in ``group``):
    ``batch_size`` is the GLOBAL batch. Every rank draws the same seeded permutation and cuts
    it into the same global batches (the last incomplete one dropped: DistributedSampler's
    drop_last, applied per global batch, so no sample is padded or repeated); rank r takes rows
    [r B / W, (r + 1) B / W) of each (B must be divisible by W) and draws their views with its
    own generator (seed, rank). The method, wrapped in DistributedDataParallel, computes its
    loss with the distributed losses (``method.distributed_mode = distributed_mode``, "gather"
    or "ring"), whose gradients make DDP's average the gradient of the global-batch loss. One
    small all-reduce per step averages the logged values over the ranks and carries rank 0's
    "time is up", so all ranks stop after the same step; ``history`` is the same on every
    rank. BatchNorm statistics stay per rank (one device's sub-batch)."""
    _check_method(method)
    if seconds is None and steps is None:
        raise ValueError("fit needs a budget: seconds and/or steps, got neither")
    seconds = _positive("seconds", seconds, optional=True)
    steps = _positive("steps", steps, numbers.Integral, optional=True)
    batch_size = _positive("batch_size", batch_size, numbers.Integral)
    lr = _positive("lr", lr)
    if not isinstance(weight_decay, numbers.Real) or weight_decay < 0:
        raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
    if len(dataset) < 2:
        raise ValueError(f"dataset must hold at least 2 items, got {len(dataset)}")
    device = training_device(method, device)
    method.to(device)
    params = [p for p in method.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    rank, world = _world(group)
    if world > 1 and batch_size % world:
        raise ValueError(f"batch_size (the global batch) must be divisible by the world size "
                         f"{world}, got {batch_size}")
    if world > 1 and distributed_mode not in ("gather", "ring"):
        raise ValueError(f"distributed_mode must be 'gather' or 'ring', got "
                         f"{distributed_mode!r}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)  # the batches (and views on one process)
    views_generator = generator if world == 1 else torch.Generator().manual_seed(
        seed * 1_000_003 + rank + 1)
    step_module = _data_parallel(method, distributed_mode, group, device) if world > 1 else None
    history = History(threads=torch.get_num_threads(), settings={
        "method": method.name, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "seed": seed, "optimizer": optimizer, "budget_seconds": seconds, "budget_steps": steps,
        "world_size": world, "device": str(device),
        **({"distributed_mode": distributed_mode} if world > 1 else {})})
    bar = _Progress(progress and rank == 0, steps if steps is not None else seconds,
                    "steps" if steps is not None else "s")
    method.train()
    start = time.perf_counter()
    paused = 0.0  # seconds spent in on_epoch
    done = time_up = False
    try:
        while not done:
            epoch_losses, epoch_bounds = [], []
            for indices in _batches(len(dataset), batch_size, generator):
                elapsed = time.perf_counter() - start - paused
                if world == 1:
                    time_up = seconds is not None and elapsed >= seconds
                if (steps is not None and history.steps >= steps) or time_up:
                    done = True
                    break
                if world > 1:
                    shard = batch_size // world
                    indices = indices[rank * shard:(rank + 1) * shard]
                batch = to_device(method.views(dataset, indices, views_generator), device)
                out = step_module(batch) if step_module is not None else method.loss(batch)
                loss = out["loss"]
                if not torch.isfinite(loss):
                    raise RuntimeError(f"{method.name}: the loss became {float(loss)} at step "
                                       f"{history.steps}; lower the learning rate")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                method.after_step()
                values = {key: float(value.detach() if torch.is_tensor(value) else value)
                          for key, value in out.items()}
                if world > 1:  # means over the ranks, and rank 0's clock
                    over = rank == 0 and seconds is not None and (
                        time.perf_counter() - start - paused >= seconds)
                    values, time_up = _reduce_step(values, over, group, world, device)
                history.steps += 1
                history.step_loss.append(values["loss"])
                history.step_mi_bound.append(values["mi_bound"])
                for key, value in values.items():
                    if key not in ("loss", "mi_bound"):
                        history.step_metrics.setdefault(key, []).append(value)
                epoch_losses.append(history.step_loss[-1])
                epoch_bounds.append(history.step_mi_bound[-1])
                now = time.perf_counter() - start - paused
                bar.update(history.steps if steps is not None else min(now, seconds),
                           f"loss {history.step_loss[-1]:.4f}")
            if epoch_losses:
                history.epoch_loss.append(statistics.fmean(epoch_losses))
                history.epoch_mi_bound.append(statistics.fmean(epoch_bounds))
                history.epoch_end_step.append(history.steps)
                bar.epoch(f"epoch {len(history.epoch_loss):4d}  step {history.steps:6d}  "
                          f"loss {history.epoch_loss[-1]:.4f}  MI bound "
                          f"{history.epoch_mi_bound[-1]:.3f} nats")
                if on_epoch is not None:
                    mark = time.perf_counter()
                    on_epoch(history, mark - start - paused)
                    paused += time.perf_counter() - mark
            elif not done:
                raise RuntimeError("an epoch produced no batch")  # pragma: no cover
    finally:
        history.seconds = time.perf_counter() - start - paused
        bar.close()
    return history


def training_device(method, device=None):
    """The torch.device ``fit`` trains ``method`` on: ``device`` ("cpu", "cuda", "cuda:<i>" or a
    torch.device; "cuda" without an index is the current GPU), or when None the device of the
    method's first parameter (or buffer; the CPU if it has neither)."""
    if device is None:
        tensor = next(method.parameters(), None)
        if tensor is None:
            tensor = next(method.buffers(), None)
        return torch.device("cpu") if tensor is None else tensor.device
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str or a torch.device, got {type(device).__name__}")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}") \
            from exc
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for, but no CUDA device is visible "
                             f"(torch.cuda.is_available() is False)")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def to_device(batch, device):
    """``batch`` (a tensor, or a dict / list / tuple of them, nested; other values as they are)
    with every tensor moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def _world(group=None):
    """(rank, world size) in ``group``, (0, 1) without torch.distributed."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _LossModule(nn.Module):
    """``method.loss`` as a forward, so DistributedDataParallel can wrap the method."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, batch):
        return self.method.loss(batch)


def _data_parallel(method, mode, group, device):
    """The method in DDP (gradients averaged over ``group``), its losses set distributed.
    On a GPU, DDP gets ``device_ids=[device.index]`` (this rank's GPU: one device per process).
    Buffers (queues, BatchNorm running statistics) are not broadcast: each method keeps its
    replicated state consistent itself (MoCo enqueues every rank's keys on every rank)."""
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    method.distributed_mode, method.group = mode, group
    # no buffer broadcast before each forward (newer torch spells it forward_sync_buffers)
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
               inspect.signature(DistributedDataParallel).parameters else
               {"broadcast_buffers": False})
    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(_LossModule(method), process_group=group,
                                   device_ids=device_ids, **no_sync)


def _reduce_step(values, over, group, world, device):
    """Means over the ranks of the step's logged values, and whether any rank said stop (one
    all_reduce on ``device``: NCCL reduces CUDA tensors only)."""
    import torch.distributed as dist

    keys = sorted(values)
    flat = torch.tensor([values[k] for k in keys] + [float(over)], dtype=torch.float64,
                        device=device)
    dist.all_reduce(flat, group=group)
    means = {k: float(v) / world for k, v in zip(keys, flat[:-1].tolist())}
    return means, bool(flat[-1] > 0)


# ---------------------------------------------------------------------------------------------
# Evaluation


class FeatureModule(nn.Module):
    """``method.features`` as a module's forward, so ``extract_features`` handles eval mode."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, x):
        return self.method.features(x)


def evaluate(method, train_set, test_set, *, k=20, batch_size=256):
    """{"probe": linear-probe accuracy, "knn": weighted kNN accuracy} of ``method.features``
    (frozen, eval mode) fitted on the training split's evaluation inputs and scored on the test
    split's."""
    _check_method(method)
    train_x, train_y = evaluation_inputs(train_set)
    test_x, test_y = evaluation_inputs(test_set)
    wrapped = FeatureModule(method)
    train_f = ev.extract_features(wrapped, train_x, batch_size=batch_size)
    test_f = ev.extract_features(wrapped, test_x, batch_size=batch_size)
    return {"probe": ev.linear_probe(train_f, train_y, test_f, test_y),
            "knn": ev.knn_accuracy(train_f, train_y, test_f, test_y, k=k)}


class Supervised(nn.Module):
    """The ceiling baseline: a method's feature network with a linear classifier on top,
    trained with cross-entropy on single augmented views of labelled items."""

    def __init__(self, method, num_classes, feature_dim):
        super().__init__()
        self.method = method
        self.classifier = nn.Linear(feature_dim, num_classes)

    def forward(self, x):
        return self.classifier(self.method.features(x))


def train_supervised(method, dataset, *, seconds=None, steps=None, batch_size, lr, seed=0):
    """Train ``method.features`` + a linear layer with cross-entropy on ``training_inputs``
    for the budget (as ``fit``); returns (the Supervised model, steps done)."""
    _check_method(method)
    if seconds is None and steps is None:
        raise ValueError("train_supervised needs a budget: seconds and/or steps, got neither")
    x, y = evaluation_inputs(dataset)
    with torch.no_grad():
        dim = FeatureModule(method).eval()(x[:2]).flatten(1).shape[1]
    model = Supervised(method, int(y.max()) + 1, dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    done, start, count = False, time.perf_counter(), 0
    while not done:
        for indices in _batches(len(dataset), batch_size, generator):
            if (steps is not None and count >= steps) or (
                    seconds is not None and time.perf_counter() - start >= seconds):
                done = True
                break
            inputs, labels = training_inputs(dataset, indices, generator)
            logits = model(inputs)
            if not logits.requires_grad:
                raise RuntimeError(f"{method.name}.features must be differentiable (no "
                                   f"torch.no_grad inside) for the supervised baseline")
            loss = F.cross_entropy(logits.flatten(1), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            count += 1
    return model, count


def baselines(make_method, train_set, test_set, *, seconds=None, steps=None, batch_size=256,
              lr=1e-3, seed=0, supervised=True, raw=True):
    """The floor and ceiling a trained method is compared with, as accuracies:

    * "untrained": ``evaluate`` of a fresh ``make_method()`` (the same encoder, random weights);
    * "raw": linear probe on the flattened evaluation inputs (``raw``);
    * "supervised": a fresh ``make_method()``'s feature network + linear layer trained with
      cross-entropy for the same budget (``supervised``), then evaluated like the method."""
    result = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        result["untrained"] = evaluate(make_method(), train_set, test_set)
    if raw:
        train_x, train_y = evaluation_inputs(train_set)
        test_x, test_y = evaluation_inputs(test_set)
        result["raw"] = {"probe": ev.raw_pixel_baseline(train_x, train_y, test_x, test_y)}
    if supervised:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            method = make_method()
            start = time.perf_counter()
            model, done = train_supervised(method, train_set, seconds=seconds, steps=steps,
                                           batch_size=batch_size, lr=lr, seed=seed)
            result["supervised"] = {**evaluate(method, train_set, test_set), "steps": done,
                                    "seconds": time.perf_counter() - start}
            test_x, test_y = evaluation_inputs(test_set)
            model.eval()
            with torch.no_grad():
                predicted = model(test_x).argmax(1)
            result["supervised"]["classifier"] = float((predicted == test_y).double().mean())
    return result


# ---------------------------------------------------------------------------------------------
# Fused vs reference loss


def step_time(method, dataset, batch_size, backend, *, repeats=5, seed=0):
    """Median seconds of one training step (loss forward + backward; the views are drawn
    beforehand and moved to the method's device) of a copy of ``method`` whose ``backend`` is
    set to ``backend``; ``method`` itself is left untouched."""
    _check_method(method)
    if not hasattr(method, "backend"):
        raise TypeError(f"{type(method).__name__} has no backend attribute to switch")
    repeats = _positive("repeats", repeats, numbers.Integral)
    generator = torch.Generator().manual_seed(seed)
    indices = _batches(len(dataset), batch_size, generator)[0]
    work = copy.deepcopy(method).train()
    work.backend = backend
    batch_device = training_device(work)
    batch = to_device(work.views(dataset, indices, generator), batch_device)
    times = []
    with torch.random.fork_rng(devices=[]):
        for _ in range(repeats + 1):  # the first run warms up
            work.zero_grad(set_to_none=True)
            start = time.perf_counter()
            work.loss(batch)["loss"].backward()
            if batch_device.type == "cuda":
                torch.cuda.synchronize(batch_device)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def same_curve(make_method, dataset, *, steps=20, batch_size, lr, seed=0,
               backends=("auto", "reference"), device=None):
    """Train two fresh methods (``make_method(backend)``, built after torch.manual_seed(seed))
    for ``steps`` steps with the same seed on ``device`` (as ``fit``), one per backend; returns
    {"losses": {backend: [..]}, "max_abs_diff": max_t |L_a(t) - L_b(t)|}."""
    losses = {}
    for backend in backends:
        torch.manual_seed(seed)
        method = make_method(backend)
        losses[backend] = fit(method, dataset, steps=steps, batch_size=batch_size, lr=lr,
                              seed=seed, progress=False, device=device).step_loss
    a, b = (losses[name] for name in backends)
    return {"losses": losses, "max_abs_diff": max(abs(x - y) for x, y in zip(a, b))}


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib optional)


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_history(history, path):
    """PNG at ``path``: the per-step loss (light) and epoch means (bold), and the InfoNCE bound
    log(N) - L, against the step."""
    plt = _pyplot()
    fig, (ax_loss, ax_mi) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps = range(1, len(history.step_loss) + 1)
    for ax, per_step, per_epoch, title in (
            (ax_loss, history.step_loss, history.epoch_loss, "loss"),
            (ax_mi, history.step_mi_bound, history.epoch_mi_bound, "MI bound log(N) - L (nats)")):
        ax.plot(steps, per_step, color="tab:blue", alpha=0.3, lw=0.8, label="step")
        ax.plot(history.epoch_end_step, per_epoch, color="tab:blue", lw=2, label="epoch mean")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax_loss.legend()
    fig.suptitle(f"{history.settings.get('method', '')}: {history.steps} steps in "
                 f"{history.seconds:.0f} s ({history.threads} thread(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def project_2d(features, method="pca", seed=0):
    """(N, 2) projection of (N, D) features: PCA (torch.pca_lowrank, centred) or t-SNE
    (scikit-learn)."""
    if method not in EMBEDDINGS:
        raise ValueError(f"method must be one of {EMBEDDINGS}, got {method!r}")
    x = features.detach().to(torch.float64).cpu()
    if method == "pca":
        _, _, v = torch.pca_lowrank(x, q=2, center=True)
        return (x - x.mean(0)) @ v[:, :2]
    try:
        from sklearn.manifold import TSNE
    except ImportError as exc:
        raise ImportError("t-SNE needs scikit-learn: pip install scikit-learn") from exc
    return torch.from_numpy(TSNE(2, init="pca", random_state=seed).fit_transform(x.numpy()))


def plot_embedding(features, labels, path, method="pca"):
    """PNG at ``path``: a 2-D projection (``project_2d``) of ``features`` coloured by class."""
    if not isinstance(features, torch.Tensor) or features.dim() != 2:
        raise ValueError(f"features must be an (N, D) tensor, got "
                         f"{getattr(features, 'shape', type(features).__name__)}")
    if not isinstance(labels, torch.Tensor) or labels.shape != (features.shape[0],):
        raise ValueError(f"labels must be a ({features.shape[0]},) tensor, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    points = project_2d(features, method)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels.numpy(), cmap="tab10", s=6)
    ax.legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    ax.set_title(f"{method.upper()} of the features")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
