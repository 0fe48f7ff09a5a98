"""``trainer.fit(device=)``: an explicit CPU device trains exactly as before, bad devices are
refused, batches follow the device, DDP gets this rank's GPU, the per-step all_reduce runs on
the training device (NCCL reduces CUDA tensors only). No GPU is needed: the CUDA cases check
what is built, with torch.cuda and the collectives monkeypatched."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.parallel

from fastcontrast.methods import data_parallel, simclr, trainer
from fastcontrast.methods.data import ClutteredDigits

TINY = {"width": 4, "feature_dim": 8, "projection_dim": 4}
FIT = {"steps": 3, "batch_size": 16, "lr": 1e-3, "seed": 2, "progress": False}


@pytest.fixture(scope="module")
def digits():
    return ClutteredDigits("train", canvas=12)


def _fit(dataset, **kwargs):
    torch.manual_seed(0)
    method = simclr.build(**TINY)
    history = trainer.fit(method, dataset, **FIT, **kwargs)
    return history, [p.detach().clone() for p in method.parameters()]


def test_fit_with_explicit_cpu_device_equals_the_default(digits):
    default, params = _fit(digits)
    for device in ("cpu", torch.device("cpu")):
        history, got = _fit(digits, device=device)
        assert history.step_loss == default.step_loss and history.steps == 3
        assert all(torch.equal(a, b) for a, b in zip(got, params))
        assert history.settings["device"] == "cpu"
    assert default.settings["device"] == "cpu"
    assert default.step_loss[0] != default.step_loss[-1]  # it trained


def test_fit_refuses_bad_devices(digits, monkeypatch):
    method = simclr.build(**TINY)
    with pytest.raises(TypeError, match="device must be a str or a torch.device, got int"):
        trainer.fit(method, digits, device=0, **FIT)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda'.*'tpu'"):
        trainer.fit(method, digits, device="tpu", **FIT)
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda'.*'meta'"):
        trainer.fit(method, digits, device="meta", **FIT)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda:0' was asked for, but no CUDA device"):
        trainer.fit(method, digits, device="cuda:0", **FIT)


def test_training_device_resolution(monkeypatch):
    method = simclr.build(**TINY)
    assert trainer.training_device(method) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert trainer.training_device(method, "cuda") == torch.device("cuda", 3)
    assert trainer.training_device(method, "cuda:1") == torch.device("cuda", 1)
    on_meta = simclr.build(**TINY).to("meta")  # None: wherever the method's parameters are
    assert trainer.training_device(on_meta) == torch.device("meta")


def test_to_device_moves_every_tensor_of_a_nested_batch():
    batch = {"views": [torch.ones(2), torch.zeros(3)], "pair": (torch.ones(1), 5),
             "index": torch.arange(2), "name": "x"}
    moved = trainer.to_device(batch, "meta")
    assert [t.device.type for t in moved["views"]] == ["meta", "meta"]
    assert isinstance(moved["pair"], tuple) and moved["pair"][0].is_meta
    assert moved["pair"][1] == 5 and moved["name"] == "x" and moved["index"].is_meta
    assert moved["views"][1].shape == (3,) and moved["index"].dtype == torch.int64


def test_data_parallel_gets_this_ranks_gpu(monkeypatch):
    built = []

    def fake_ddp(module, process_group=None, device_ids=None, broadcast_buffers=True):
        built.append({"device_ids": device_ids, "broadcast_buffers": broadcast_buffers})
        return module

    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", fake_ddp)
    method = simclr.build(**TINY)
    data_parallel.wrap_data_parallel(method, "ring", None, torch.device("cuda", 1))
    data_parallel.wrap_data_parallel(method, "gather", None, torch.device("cpu"))
    assert built == [{"device_ids": [1], "broadcast_buffers": False},
                     {"device_ids": None, "broadcast_buffers": False}]
    assert method.distributed_mode == "gather"


def test_step_reduction_runs_on_the_training_device(monkeypatch):
    seen = []

    def fake_all_reduce(tensor, group=None):
        seen.append(tensor.device)
        if tensor.device.type == "cpu":
            tensor.mul_(2)  # two ranks with the same values

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    means, stop = data_parallel.reduce_step({"loss": 1.5, "mi_bound": 0.25}, True, None, 2,
                                       torch.device("cpu"))
    assert means == {"loss": 1.5, "mi_bound": 0.25} and stop is True
    with pytest.raises(Exception):  # a meta tensor cannot be read back: the device was used
        data_parallel.reduce_step({"loss": 1.0}, False, None, 2, torch.device("meta"))
    assert seen == [torch.device("cpu"), torch.device("meta")]


@pytest.mark.parametrize("name", ["cpc", "dim", "amdim"])
def test_nproc_is_refused_for_a_method_without_a_data_parallel_loss(name, capsys):
    from fastcontrast.cli import main

    assert main(["train", name, "--nproc", "2", "--steps", "1"]) != 0
    assert f"--nproc 2: {name} has no data-parallel loss" in capsys.readouterr().err
