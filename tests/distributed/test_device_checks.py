"""``--device cuda`` is checked before any process starts: no visible CUDA device, or fewer GPUs
than ``--nproc``, is a ValueError naming the option and the numbers, printed by the CLI as a
normal error (exit status 1, no traceback); ``local_device`` picks LOCAL_RANK % GPUs. CPU-only:
torch.cuda is monkeypatched."""
import pytest
import torch
import torch.multiprocessing

from fastcontrast.cli import main
from fastcontrast.cli import train as train_cli
from fastcontrast.methods import launch


@pytest.fixture
def no_start(monkeypatch):
    """Fail the test if training or a process would start."""
    def refuse(*args, **kwargs):
        raise AssertionError("started although the device check should have failed")

    monkeypatch.setattr(torch.multiprocessing, "start_processes", refuse)
    monkeypatch.setattr(train_cli, "_train_and_report", refuse)
    monkeypatch.setattr(launch, "init_group", refuse)


def _gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_check_device(monkeypatch):
    launch.check_device("cpu", 8)  # always fine
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        launch.check_device("tpu")
    _gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="device cuda was asked for, but no CUDA device is "
                                         r"visible \(torch.cuda.is_available\(\) is False\)"):
        launch.check_device("cuda")
    _gpus(monkeypatch, 2)
    launch.check_device("cuda", 2)
    with pytest.raises(ValueError, match="nproc 3 with device cuda needs 3 GPUs .* but 2 are "
                                         "visible"):
        launch.check_device("cuda", 3)


@pytest.mark.parametrize("argv, visible, message", [
    ([], 0, "fastcontrast train: error: --device cuda was asked for, but no CUDA device is "
            "visible (torch.cuda.is_available() is False); use --device cpu"),
    (["--nproc", "2"], 0, "--device cuda was asked for, but no CUDA device is visible"),
    (["--nproc", "2"], 1, "fastcontrast train: error: --nproc 2 with --device cuda needs 2 GPUs "
                          "(one per process), but 1 is visible"),
    (["--nproc", "4"], 3, "--nproc 4 with --device cuda needs 4 GPUs (one per process), but 3 "
                          "are visible"),
])
def test_cli_refuses_cuda_before_starting(argv, visible, message, monkeypatch, capsys, no_start):
    _gpus(monkeypatch, visible)
    code = main(["train", "simclr", "--device", "cuda", "--steps", "1", "--quiet", *argv])
    err = capsys.readouterr().err
    assert code == 1
    assert message in err and "Traceback" not in err


def test_cli_under_torchrun_checks_the_local_gpus(monkeypatch, capsys, no_start):
    for key, value in {"RANK": "0", "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "1", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    _gpus(monkeypatch, 2)
    assert main(["train", "moco", "--device", "cuda", "--steps", "1", "--quiet"]) == 1
    assert "torchrun's --nproc-per-node 4 with --device cuda needs 4 GPUs" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE 4 with device cuda needs 4 GPUs"):
        launch.run_in_torchrun(print, device="cuda")


def test_spawn_refuses_before_starting(monkeypatch, no_start):
    _gpus(monkeypatch, 1)
    with pytest.raises(ValueError, match="nproc 2 with device cuda needs 2 GPUs"):
        launch.spawn(print, 2, device="cuda")


def test_local_device(monkeypatch):
    assert launch.local_device("cpu") == torch.device("cpu")
    _gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launch.local_device("cuda") == torch.device("cuda", 1)
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert launch.local_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        launch.local_device("cuda:0")
