"""Kernel-test fixtures: the C++ kernels' two sets of passes."""
import pytest

SHARED_SHIFT_ENV = "FASTCONTRAST_SHARED_SHIFT"


@pytest.fixture(autouse=True, params=["shared-shift", "exact"])
def _cpu_passes(request, monkeypatch):
    """Cases on the C++ backend run twice: with the shared-shift passes (one exp per score,
    falling back to the exact passes where the score bound is too loose) and with the exact
    passes only (FASTCONTRAST_SHARED_SHIFT=0). Every other case runs once."""
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec else None
    if request.param == "exact":
        if backend != "cpu":
            pytest.skip("FASTCONTRAST_SHARED_SHIFT switches the C++ kernels' passes only")
        monkeypatch.setenv(SHARED_SHIFT_ENV, "0")
    else:
        monkeypatch.delenv(SHARED_SHIFT_ENV, raising=False)
