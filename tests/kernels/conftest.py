"""Kernel-test fixtures: the C++ kernels' two sets of passes, the loaded extension, two
threads."""
import pytest
import torch


@pytest.fixture(autouse=True, params=["shared-shift", "exact"])
def _cpu_passes(request, configure):
    """Cases on the C++ backend run twice: with the shared-shift passes (one exp per score,
    falling back to the exact passes where the score bound is too loose) and with the exact
    passes only (the shared_shift setting off, fastcontrast/_config.py). Every other case runs
    once."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if request.param == "exact" and backend != "cpu":
        pytest.skip("the shared_shift setting switches the C++ kernels' passes only")
    configure(shared_shift=request.param != "exact")


@pytest.fixture
def ext():
    """The C++ extension module (tests using it skip where it is unavailable)."""
    import fastcontrast._ext as ext_loader

    return ext_loader.load_extension()


@pytest.fixture
def two_threads():
    """torch's thread count set to 2 for the test (the scheduler and thread-count checks)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)
