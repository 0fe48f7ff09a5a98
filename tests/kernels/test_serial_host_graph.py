"""serial_host_graph (fastcontrast/_host_threads.py): a host computation whose gradients autograd
runs, differentiated on the calling thread alone (the Matryoshka loss's host passes), with the
values and gradients of the plain call, retain_graph honoured and the inner graph freed with the
outer one."""
import pytest
import torch

import fastcontrast as fc
from fastcontrast._config import override
from fastcontrast._host_threads import serial_host_graph

from .._helpers import backend_usable

pytestmark = pytest.mark.skipif(not backend_usable("cpu"), reason="C++ extension unavailable")


def _host(threads):
    """x -> sum((2 x)^2), recording the ATen thread count where its backward passes."""
    def fn(x):
        h = x * 2
        h.register_hook(lambda g: threads.append(torch.get_num_threads()))
        return (h * h).sum()
    return fn


def test_the_backward_runs_on_the_calling_thread(ext, two_threads):
    threads = []
    x = torch.randn(5, 3, requires_grad=True)
    serial_host_graph(_host(threads), "cpu", x).backward()
    assert threads == [1]
    assert torch.get_num_threads() == 2
    torch.testing.assert_close(x.grad, 8 * x.detach())


def test_other_backends_and_no_grad_call_fn_as_it_is(ext, two_threads):
    threads = []
    x = torch.randn(5, 3, requires_grad=True)
    serial_host_graph(_host(threads), "torch", x).backward()
    assert threads == [2]
    with torch.no_grad():
        assert not serial_host_graph(lambda t: (t * t).sum(), "cpu", x).requires_grad


def test_retain_graph_and_the_inner_graph_freed_with_the_outer(ext, two_threads):
    x = torch.randn(5, 3, requires_grad=True)
    out = serial_host_graph(_host([]), "cpu", x)
    first = torch.autograd.grad(out, x, retain_graph=True)[0]
    second = torch.autograd.grad(out, x)[0]
    torch.testing.assert_close(first, second)
    assert out.grad_fn.graph is None  # no longer retained: its buffers went with the outer ones
    with pytest.raises(RuntimeError, match="second time"):
        out.backward()


def test_matryoshka_matches_with_the_setting_off(two_threads):
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(300, 40, generator=gen), torch.randn(300, 40, generator=gen)
    results = []
    for serial in (True, False):
        with override(serial_host_ops=serial):
            x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
            value = fc.info_nce(x, y, matryoshka_dims=(8, 24, 40), backend="cpu")
            value.backward()
            results.append((value.detach(), x.grad, y.grad))
    for on, off in zip(*results):
        torch.testing.assert_close(on, off, rtol=1e-6, atol=1e-7)
