"""Peak extra memory of one loss's forward+backward, fused against plain PyTorch, each in a fresh
process (the claim: info_nce at N = M = 16384, D = 256, fp32, under 2% of plain PyTorch).

    python -m benchmarks.memory_probe [--n 16384] [--dim 256] [--losses info_nce] [--out DIR]

How: fastcontrast.cli.measure.peak_extra_memory in a spawned child with
MALLOC_MMAP_THRESHOLD_=65536 (set here for the children unless already set: large temporaries go
to mmap and come back to the system when freed, so VmHWM sees each allocation's real lifetime).
The child builds the inputs (leaves that require grad), runs a small warm-up problem, resets
VmHWM (``echo 5 > /proc/self/clear_refs``) and then runs forward + ``.backward()``: the peak
includes the ``.grad`` tensors of both inputs. "fused" is backend "cpu"; "torch" is plain
PyTorch: for info_nce the demo's baseline (fastcontrast.cli.demo.naive_info_nce: normalised
logits and F.cross_entropy, as the README's and CHANGELOG's figures), for the other losses the
reference backend (plain PyTorch on the materialised logits).
"""
import os
import sys

if __package__ in (None, ""):  # run as a script: the checkout's fastcontrast.benchmarks
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._bootstrap import ensure_package

    ensure_package()

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
IMPLS = {"fused": "cpu", "torch": "reference"}
LOSSES = ("info_nce", "clip_loss", "nt_xent", "supcon")
TARGET = 0.02


def make_step(loss, backend, n, dim, seed=0):
    """A zero-argument forward + backward (into .grad) of ``loss`` on fresh float32 inputs;
    top-level so that the memory probe pickles it by name."""
    import torch
    import torch.nn.functional as F

    import fastcontrast as fc
    from fastcontrast.cli.measure import backward_step

    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(n, dim, generator=gen).requires_grad_(True)
    b = (a.detach() + 1.5 * torch.randn(n, dim, generator=gen)).requires_grad_(True)
    labels = torch.randint(0, 100, (n,), generator=gen)
    if loss == "info_nce" and backend == "reference":  # the plain-PyTorch baseline of the demo
        from fastcontrast.cli.demo import naive_info_nce

        calls = {"info_nce": lambda: naive_info_nce(a, b, 0.07)}
    else:
        calls = {}
    calls = calls or {
        "info_nce": lambda: fc.info_nce(a, b, temperature=0.07, backend=backend),
        "clip_loss": lambda: fc.clip_loss(F.normalize(a, dim=-1), F.normalize(b, dim=-1), 100.0,
                                          backend=backend),
        "nt_xent": lambda: fc.nt_xent(a, b, temperature=0.5, backend=backend),
        "supcon": lambda: fc.supcon(a, labels, temperature=0.1, backend=backend),
    }

    return backward_step(calls[loss], a, b)


def main(argv=None):
    from fastcontrast.cli.measure import peak_extra_memory, problem_parser, save_json

    parser = problem_parser(__doc__.split("\n")[0])
    parser.add_argument("--losses", default="info_nce")
    parser.add_argument("--impls", default="fused,torch")
    parser.add_argument("--out", default=None, help="folder for memory_probe.json")
    args = parser.parse_args(argv)
    for key, value in MALLOC_ENV.items():
        os.environ.setdefault(key, value)  # inherited by the spawned children

    result = {"n": args.n, "dim": args.dim, "dtype": "float32",
              "env": {k: os.environ[k] for k in MALLOC_ENV}, "losses": {}}
    for loss in [name for name in args.losses.split(",") if name]:
        row = {}
        for impl in [name for name in args.impls.split(",") if name]:
            r = peak_extra_memory(make_step, loss, IMPLS[impl], args.n, args.dim,
                                  warmup_args=(loss, IMPLS[impl], 256, args.dim))
            row[impl] = {"extra_bytes": r.extra_bytes, "seconds": r.seconds, "method": r.method,
                         "loss": r.value}
            print(f"{loss} {impl}: {r.extra_bytes / 1e6:.1f} MB extra ({r.method}), "
                  f"{r.seconds:.2f} s, loss {r.value}", flush=True)
        if "fused" in row and "torch" in row:
            ratio = row["fused"]["extra_bytes"] / max(1, row["torch"]["extra_bytes"])
            row["ratio"] = ratio
            print(f"{loss}: fused / torch = {100 * ratio:.2f}% (target < {100 * TARGET:.0f}%)")
        result["losses"][loss] = row
    save_json(args.out, "memory_probe.json", result)
    return result


if __name__ == "__main__":
    main()
