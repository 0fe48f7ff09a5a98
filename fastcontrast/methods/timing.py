"""The fused loss against the reference one inside a reference method: the time of one training
step per backend, and the training curves of two backends from the same seed."""
import copy
import numbers
import statistics
import time

import torch

from .trainer import _batches, _check_method, _positive, fit, to_device, training_device


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
