"""Start N training processes on this machine, or join the ones torchrun started.

    results = spawn(worker, nproc=2, args=(settings,), timeout=600)   # [worker's return per rank]
    # inside worker(rank, world_size, *args): the default process group is initialised

``spawn`` picks a free TCP port on 127.0.0.1, starts ``nproc`` processes with
``torch.multiprocessing`` (spawn start method), initialises ``torch.distributed`` in each (gloo on
CPU, NCCL when ``device="cuda"``; one GPU per local rank) with a timeout on every collective,
runs ``worker(rank, world_size, *args)``, tears the group down and returns what each rank
returned (pickled through a temporary file, so large values cannot block a pipe). A rank that
raises makes ``spawn`` raise with its traceback; processes still alive at ``timeout`` or after a
failure are killed, so a failing run never hangs.

Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR in the environment) ``launched_by_torchrun()`` is
true and ``run_in_torchrun(worker, args)`` initialises the group from the environment (env://)
and runs the worker in this process instead.

``check_device(device, nproc)`` fails early (a ValueError, before any process starts) when
``device="cuda"`` has no CUDA device or fewer than ``nproc`` GPUs visible;
``local_device(device)`` is the torch.device a process trains on: ``cuda:<LOCAL_RANK % GPUs>``
(the GPU ``init_group`` selected), or the CPU.
"""
import os
import pickle
import socket
import tempfile
import time
import traceback
from datetime import timedelta

__all__ = ["free_port", "spawn", "launched_by_torchrun", "run_in_torchrun", "init_group",
           "dist_backend", "check_device", "local_device", "DEVICES"]

DEVICES = ("cpu", "cuda")

DEFAULT_COLLECTIVE_TIMEOUT_S = 1800.0


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_backend(device):
    """"nccl" for CUDA training, "gloo" on CPU."""
    if device not in DEVICES:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return "nccl" if device == "cuda" else "gloo"


def check_device(device, nproc=1, *, names=("device", "nproc")):
    """Raise a ValueError unless ``nproc`` processes on this machine can train on ``device``:
    "cpu" always; "cuda" needs torch.cuda.is_available() and at least ``nproc`` visible GPUs
    (one per process). ``names``: how the messages call the two settings (e.g. the CLI's
    "--device", "--nproc")."""
    import torch

    dist_backend(device)  # validates the name
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ValueError(f"{names[0]} {device} was asked for, but no CUDA device is visible "
                         f"(torch.cuda.is_available() is False); use {names[0]} cpu")
    count = torch.cuda.device_count()
    if count < nproc:
        raise ValueError(f"{names[1]} {nproc} with {names[0]} {device} needs {nproc} GPUs (one "
                         f"per process), but {count} {'is' if count == 1 else 'are'} visible")


def local_device(device):
    """The torch.device this process trains on: the CPU, or for "cuda" GPU
    LOCAL_RANK % device_count (the one ``init_group`` selected; the current GPU when
    LOCAL_RANK is not set, i.e. on one process)."""
    import torch

    dist_backend(device)
    if device == "cpu":
        return torch.device("cpu")
    local = os.environ.get("LOCAL_RANK")
    index = (torch.cuda.current_device() if local is None else
             int(local) % torch.cuda.device_count())
    return torch.device("cuda", index)


def launched_by_torchrun():
    """True when this process was started by torchrun (or another env:// launcher)."""
    return all(key in os.environ for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_group(rank, world_size, *, device="cpu", init_method="env://",
               timeout_s=DEFAULT_COLLECTIVE_TIMEOUT_S):
    """Initialise the default process group (and the local GPU with NCCL)."""
    import torch
    import torch.distributed as dist

    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
    dist.init_process_group(dist_backend(device), init_method=init_method, rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout_s))


def run_in_torchrun(worker, args=(), *, device="cpu", timeout_s=DEFAULT_COLLECTIVE_TIMEOUT_S):
    """Run ``worker(rank, world_size, *args)`` in this torchrun-started process (with
    ``device="cuda"``: NCCL, and GPU LOCAL_RANK % device_count)."""
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    check_device(device, int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
                 names=("device", "LOCAL_WORLD_SIZE"))
    init_group(rank, world, device=device, timeout_s=timeout_s)
    try:
        return worker(rank, world, *args)
    finally:
        dist.destroy_process_group()


def _entry(rank, worker, world_size, port, folder, device, timeout_s, threads, args):
    """Runs in each spawned process."""
    import torch
    import torch.distributed as dist

    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    path = os.path.join(folder, f"rank{rank}.pkl")
    try:
        init_group(rank, world_size, device=device, init_method=f"tcp://127.0.0.1:{port}",
                   timeout_s=timeout_s)
        try:
            value = worker(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        outcome = ("ok", value)
    except BaseException:  # noqa: BLE001 - reported to the parent, then re-raised there
        outcome = ("error", traceback.format_exc())
    with open(path + ".tmp", "wb") as f:
        pickle.dump(outcome, f)
    os.replace(path + ".tmp", path)


def spawn(worker, nproc, args=(), *, device="cpu", timeout=None,
          collective_timeout_s=DEFAULT_COLLECTIVE_TIMEOUT_S, threads=None):
    """Run ``worker(rank, nproc, *args)`` in ``nproc`` fresh processes; returns the list of
    their return values (rank order). ``worker`` must be a top-level (picklable) function.

    timeout: seconds for the whole run (None: no limit); past it every process is killed and a
    TimeoutError raised. collective_timeout_s: the process group's timeout on each collective.
    threads: torch.set_num_threads in each process (None: torch's default). device: "cpu"
    (gloo) or "cuda" (NCCL, rank r on GPU r; ``check_device`` runs before any process starts).
    """
    import torch.multiprocessing as mp

    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    check_device(device, nproc)
    with tempfile.TemporaryDirectory(prefix="fastcontrast-spawn-") as folder:
        port = free_port()
        context = mp.start_processes(
            _entry, args=(worker, nproc, port, folder, device, collective_timeout_s, threads,
                          tuple(args)),
            nprocs=nproc, join=False, start_method="spawn")
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                failed = _first_error(folder, nproc)
                if failed is not None:
                    raise RuntimeError(f"rank {failed[0]} failed:\n{failed[1]}")
                if all(not p.is_alive() for p in context.processes):
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the {nproc} processes did not finish within "
                                       f"{timeout} s (killed)")
                time.sleep(0.05)
            failed = _first_error(folder, nproc)
            if failed is not None:
                raise RuntimeError(f"rank {failed[0]} failed:\n{failed[1]}")
            values = []
            for rank in range(nproc):
                path = os.path.join(folder, f"rank{rank}.pkl")
                if not os.path.exists(path):
                    code = context.processes[rank].exitcode
                    raise RuntimeError(f"rank {rank} exited with code {code} without a result")
                with open(path, "rb") as f:
                    values.append(pickle.load(f)[1])
            return values
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
            for p in context.processes:
                p.join(5)


def _first_error(folder, nproc):
    for rank in range(nproc):
        path = os.path.join(folder, f"rank{rank}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                status, value = pickle.load(f)
            if status == "error":
                return rank, value
    return None
