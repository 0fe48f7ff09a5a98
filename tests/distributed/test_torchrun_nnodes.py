"""Multi-node as users launch it: two torchrun launchers on this machine (``--nnodes 2``, one
process each, c10d rendezvous on 127.0.0.1, gloo) run a DDP step of the distributed clip_loss and
nt_xent; each rank's loss (the group convention: mean over ranks = the single-process mean) and
the DDP-averaged gradients equal one process on the whole batch (float64)."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import fastcontrast as fc

from . import _torchrun_worker as worker

DEADLINE_S = 240  # a safety net: every collective already times out after worker.TIMEOUT_S


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out_dir):
    """Both launchers; kills them at the deadline. Returns their (exit code, output) pairs."""
    port = _free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(),
                                                        os.environ.get("PYTHONPATH")])))
    script = os.path.abspath(worker.__file__)
    launchers = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fastcontrast-test",
               "--rdzv-conf", f"is_host={node == 0},join_timeout=60", "--max-restarts", "0",
               script, str(out_dir)]
        launchers.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
    results = []
    try:
        for proc in launchers:
            out, _ = proc.communicate(timeout=DEADLINE_S)
            results.append((proc.returncode, out))
    finally:
        for proc in launchers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("torchrun")
    for code, out in _launch(out_dir):
        assert code == 0, out[-3000:]
    return [torch.load(out_dir / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("name", ["clip_loss", "nt_xent"])
def test_two_launchers_equal_one_process_on_the_whole_batch(ranks, name):
    model, x, y = worker.build()
    want_loss, want_grads = worker.losses(model, x, y, fc.clip_loss, fc.nt_xent)[name]
    assert all(r["world_size"] == 2 for r in ranks)
    got_loss = sum(r[name][0] for r in ranks) / 2
    assert torch.allclose(got_loss, want_loss, rtol=1e-10, atol=0), (got_loss, want_loss)
    for rank in ranks:  # DDP averaged them: the same on every rank
        for param, want in want_grads.items():
            got = rank[name][1][param]
            assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (
                name, param, (got - want).abs().max())
    if name == "clip_loss":
        assert want_grads["log_scale"].abs() > 0  # the scale is learnt through the loss
