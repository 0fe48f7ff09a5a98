"""The training loop of the reference methods through their common interface (``base.py``).

    method = fastcontrast.methods.build("simclr")
    train, test = datasets("digits")
    history = fit(method, train, seconds=180, batch_size=256, lr=1e-3, seed=0)

``fit`` runs epochs over a seeded permutation of the training set (the last incomplete batch
dropped), Adam by default, until the step count or the time budget is reached, and logs the
per-step loss and InfoNCE bound log(N) - L (the method's "mi_bound"), plus their epoch means.
With torch.distributed initialised (``fastcontrast train METHOD --nproc N``, or torchrun) it
trains data-parallel (``data_parallel.py``): see ``fit``. ``fit(..., device=)`` trains on that
device: the method is moved there and each batch (drawn on the CPU) follows it.
Scoring a trained method is in ``scoring.py``, the fused-vs-reference step timing in
``timing.py``, the plots in ``plots.py``.
"""
import math
import numbers
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch

from .base import ContrastiveMethod
from .data_parallel import rank_and_world, reduce_step, wrap_data_parallel

DATASETS = ("digits", "speakers")


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
    rank, world = rank_and_world(group)
    if world > 1 and not method.data_parallel:
        raise ValueError(f"{method.name} has no data-parallel loss: with {world} processes each "
                         f"would train on its own shard's loss, not the global batch's; run it "
                         f"in one process (methods with one: simclr, moco, cmc)")
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
    step_module = wrap_data_parallel(method, distributed_mode, group, device) if world > 1 else None
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
                    values, time_up = reduce_step(values, over, group, world, device)
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
