"""``import fastcontrast`` costs little beyond ``import torch``: it imports neither torch._dynamo
(about 1.2 s and 150 MiB; only torch.compile needs it) nor triton. Every CLI call, DataLoader
worker and test process pays the import."""
import subprocess
import sys

import torch

from fastcontrast import backends


def test_import_pulls_in_neither_dynamo_nor_triton():
    code = ("import sys, fastcontrast; "
            "print(sorted(m for m in ('torch._dynamo', 'torch._inductor', 'triton') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == "[]", out


def test_resolution_is_marked_constant_as_the_decorator_marks_it():
    """backends._resolve_name sets by hand what torch.compiler.assume_constant_result sets (so
    that the import needs no dynamo): the decorator must still set exactly that."""

    def probe():
        return 0

    before = set(vars(probe))
    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe
    added = {name: getattr(probe, name) for name in set(vars(probe)) - before}
    assert added == {"_dynamo_marked_constant": True}
    assert backends._resolve_name._dynamo_marked_constant is True
