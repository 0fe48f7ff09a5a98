"""Serial host passes (fastcontrast/_host_threads.py, csrc/cpu/host_threads.h): inside the scope
the calling thread's ATen ops run on it alone while every kernel entry point gets the full
thread count back; the scope nests, survives exceptions, stays on its thread, and changes no
loss value beyond round-off."""
import threading

import pytest
import torch

import fastcontrast as fc
from fastcontrast._config import override
from fastcontrast._host_threads import serial_host_ops

from .._helpers import backend_usable

pytestmark = pytest.mark.skipif(not backend_usable("cpu"), reason="C++ extension unavailable")


def _kernel_threads(ext):
    """The thread count a kernel entry point sees: masked_lse_fused_plan sizes its tile slots
    from it (threads + 1, capped by the row blocks)."""
    return ext.masked_lse_fused_plan(1 << 16, 1 << 16, 64, 4)[1] - 1


def test_host_ops_on_one_thread_kernels_on_all(ext, two_threads):
    assert ext.get_num_threads() == 2
    full = _kernel_threads(ext)
    with serial_host_ops("cpu"):
        assert ext.get_num_threads() == 1
        assert torch.get_num_threads() == 1
        assert _kernel_threads(ext) == full
        assert ext.get_num_threads() == 1  # back to one after the kernel
    assert ext.get_num_threads() == 2


def test_nested_scopes_leave_the_outer_in_charge(ext, two_threads):
    with serial_host_ops("cpu"):
        with serial_host_ops("cpu"):
            assert ext.get_num_threads() == 1
        assert ext.get_num_threads() == 1
        assert _kernel_threads(ext) == _kernel_threads_outside(ext)
    assert ext.get_num_threads() == 2


def _kernel_threads_outside(ext):
    result = []
    worker = threading.Thread(target=lambda: result.append(_kernel_threads(ext)))
    worker.start()
    worker.join(timeout=60)
    return result[0]


def test_an_exception_leaves_the_thread_count_as_it_was(ext, two_threads):
    with pytest.raises(RuntimeError, match="inside"):
        with serial_host_ops("cpu"):
            raise RuntimeError("inside")
    assert ext.get_num_threads() == 2


def test_the_scope_is_per_thread(ext, two_threads):
    seen = []
    inside, release = threading.Event(), threading.Event()

    def other():
        torch.set_num_threads(2)
        inside.wait(timeout=60)
        seen.append(ext.get_num_threads())
        release.set()

    worker = threading.Thread(target=other)
    worker.start()
    with serial_host_ops("cpu"):
        inside.set()
        assert release.wait(timeout=60)
    worker.join(timeout=60)
    assert seen == [2]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_other_backends_are_left_alone(ext, two_threads, backend):
    with serial_host_ops(backend):
        assert ext.get_num_threads() == 2


def test_the_setting_turns_it_off(ext, two_threads, configure):
    configure(serial_host_ops=False)
    with serial_host_ops("cpu"):
        assert ext.get_num_threads() == 2


@pytest.mark.parametrize("loss", ["info_nce", "clip_loss", "nt_xent", "supcon", "siglip_loss"])
def test_losses_and_gradients_match_with_the_setting_off(two_threads, loss):
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(300, 40, generator=gen), torch.randn(300, 40, generator=gen)
    labels = torch.randint(0, 20, (300,), generator=gen)
    calls = {"info_nce": lambda x, y: fc.info_nce(x, y, backend="cpu"),
             "clip_loss": lambda x, y: fc.clip_loss(x, y, 10.0, backend="cpu"),
             "nt_xent": lambda x, y: fc.nt_xent(x, y, backend="cpu"),
             "supcon": lambda x, y: fc.supcon(x, labels, backend="cpu"),
             "siglip_loss": lambda x, y: fc.siglip_loss(x, y, 10.0, -5.0, backend="cpu")}
    results = []
    for serial in (True, False):
        with override(serial_host_ops=serial):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            value = calls[loss](x, y)
            value.backward()
            results.append((value.detach(), x.grad, y.grad))
    for on, off in zip(*results):
        if on is None or off is None:
            assert on is off
            continue
        torch.testing.assert_close(on, off, rtol=1e-6, atol=1e-7)


def test_every_kernel_entry_point_restores_the_kernel_threads():
    """A binding that released the GIL with pybind11's guard alone would run its kernel on one
    thread inside a serial host scope: every entry point takes kernel_call_guard."""
    from pathlib import Path

    csrc = Path(__file__).resolve().parents[2] / "csrc"
    offenders = [str(path.relative_to(csrc)) for path in sorted(csrc.rglob("*.cpp"))
                 if "call_guard<py::gil_scoped_release>" in path.read_text()
                 or "call_guard<pybind11::gil_scoped_release>" in path.read_text()]
    assert offenders == []
