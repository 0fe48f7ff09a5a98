"""The grids ``fastcontrast bench --suite NAME`` runs.

    default         the curve: N = 1024 ... 16384 (doubling), D = 256, fp32, CPU: InfoNCE, CLIP,
                    NT-Xent, fastcontrast against every CPU peer, each case within a 2 GiB
                    memory budget (what does not fit is an OOM point, measured, or predicted
                    from the implementation's own peaks at N/4 and N/2: worker.run_series);
                    more timed runs at small N, fewer at large; each implementation's N in one
                    process. Sized for about 3 minutes on a quiet 2-core machine.
    full            N = 1024 ... 131072, D in {128, 256, 1024}, fp32 / bf16, every family.
    large-batch     moco N = 256, K = 65536, D = 128 vs the concat-logits MoCo loss; nt_xent and
                    supcon at N = 2B = 16384, D = 256 vs lightly / pytorch-metric-learning.
    gpu             CUDA: bf16 / fp32, N = 16384 and 131072, and fastcontrast alone at N = 2^20
                    (bf16); sized to fit benchmarks/gpu_check.sh's few minutes. Widen it with
                    --suite full --device cuda (fp16 via --families/--sizes as needed).
    compat          each peer beside its drop-in twin from fastcontrast.compat (the same
                    constructor and call): N = 4096, D = 256, fp32, every family with a peer,
                    4 GiB per case (pytorch-metric-learning's NT-Xent forms a pairs x pairs
                    mask and runs out of it). Twins run in this suite only.
    smoke           tiny sizes, for the harness's own tests.

Measurement suites with a method of their own (SCRIPT_SUITES: each a module of benchmarks/ whose
``main(argv)`` takes ``--out DIR`` and its own options, given after ``--``):

    fastcontrast bench --suite gram --out DIR -- --rows 16384 --repeats 5
    distributed     symmetric CLIP on W = 2 gloo processes (1 thread each), global batch 16384,
                    D = 256: fastcontrast.distributed ring and gather against OpenCLIP's
                    ClipLoss(local_loss=True, gather_with_grad=True): per-rank peak memory, key
                    memory, bytes sent, time; gradient caching of a small CNN at batch 8192,
                    chunk 512 against the plain step (benchmarks/distributed_targets.py).
"""
from dataclasses import dataclass, field

from .families import FAMILIES, Problem

GiB = 1 << 30
COMPILE_SKIP = ("torch.compile compiles for minutes on a small CPU (measured: 160 s for the "
                "first graph on 2 cores); it is in --suite full")

TORCH_SKIP = ("fastcontrast's pure-PyTorch fallback backend is left out of the 3-minute default "
              "(the C++ backend is what CPU users get); it is in --suite full")
GPU_COMPILE_SKIP = "left out of the timed GPU check (compilation per shape and dtype)"
GPU_TORCH_SKIP = "the GPU check times the default (triton) backend"


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    device: str
    families: tuple
    sizes: tuple                 # N values
    dims: tuple
    dtypes: tuple
    repeats: int = 3
    time_limit_s: float = 120.0
    budget_gib: float = None     # memory budget of every case (None: the --memory-budget default)
    search_budget_gib: float = None   # largest-N search within this budget (None: no search)
    search_max_n: int = 0
    queue: int = 0               # moco's K
    impls: tuple = None          # only these implementations (None: all)
    skip: dict = field(default_factory=dict)   # implementation -> reason (recorded as SKIPPED)
    fastcontrast_only_above: int = None        # larger N: fastcontrast implementations only
    part: str = "grid"
    repeats_by_n: dict = None    # N -> timed runs (None: ``repeats`` at every N)
    series: bool = False         # each implementation's N ascending in one worker process
    twins: bool = False          # run the peers' fastcontrast.compat twins ("compat <peer>")

    def repeats_at(self, n):
        return (self.repeats_by_n or {}).get(n, self.repeats)


CURVE_SIZES = tuple(1024 << i for i in range(5))   # 1024 ... 16384
CURVE_REPEATS = {1024: 5, 2048: 4, 4096: 3, 8192: 1, 16384: 1}  # cheap at small N

SUITES = {
    "default": Suite(
        "default", "curve: N = 1024 ... 16384, D = 256, fp32, 2 GiB memory budget per case",
        "cpu", ("infonce", "clip", "ntxent"), CURVE_SIZES, (256,), ("fp32",), repeats=3,
        time_limit_s=45, budget_gib=2.0,
        skip={"torch.compile": COMPILE_SKIP, "fastcontrast[torch]": TORCH_SKIP},
        part="curve", repeats_by_n=CURVE_REPEATS, series=True),
    "full": Suite(
        "full", "N = 1024 ... 131072, D in {128, 256, 1024}, fp32 / bf16", "cpu",
        ("infonce", "clip", "ntxent", "supcon", "siglip"),
        tuple(1024 << i for i in range(8)), (128, 256, 1024), ("fp32", "bf16"), repeats=3,
        time_limit_s=600),
    "large-batch": Suite(
        "large-batch", "moco N=256 K=65536 D=128; nt_xent / supcon at 2N = 16384, D = 256",
        "cpu", ("ntxent", "supcon"), (16384,), (256,), ("fp32",), repeats=3, time_limit_s=300,
        skip={"torch.compile": COMPILE_SKIP, "fastcontrast[torch]": "the targets compare the "
              "default (cpu) backend"}, part="targets"),
    "gpu": Suite(
        "gpu", "CUDA: bf16 / fp32, N = 16384 and 131072; fastcontrast alone at N = 2^20 (bf16)",
        "cuda", ("infonce", "clip", "ntxent"), (16384, 131072), (256,), ("bf16", "fp32"),
        repeats=5, time_limit_s=90, skip={"torch.compile": GPU_COMPILE_SKIP,
                                          "fastcontrast[torch]": GPU_TORCH_SKIP}),
    "compat": Suite(
        "compat", "peers beside their fastcontrast.compat twins: N = 4096, D = 256, fp32",
        "cpu", ("infonce", "clip", "ntxent", "supcon", "siglip"), (4096,), (256,),
        ("fp32",), repeats=3, time_limit_s=120, budget_gib=4.0, twins=True,
        impls=tuple(name for family in FAMILIES.values() for name, impl in
                    family.implementations.items() if impl.kind in ("peer", "compat"))),
    "smoke": Suite(
        "smoke", "tiny sizes (tests of the harness)", "cpu", ("infonce", "ntxent"), (64,), (8,),
        ("fp32",), repeats=1, time_limit_s=60, search_budget_gib=0.25, search_max_n=128,
        impls=("fastcontrast[torch]", "naive"), part="headline"),
}

#: suite -> (module of benchmarks/, what it measures). Each module's ``main(argv)`` parses
#: ``--out DIR`` (the methods scripts: a positional) and options of its own.
SCRIPT_SUITES = {
    "core": ("core_targets", "the fused InfoNCE core: N = M = 16384 against plain PyTorch, "
                             "time over the matmul floor, N = 131072 within memory"),
    "gram": ("gram_targets", "nt_xent / supcon on the symmetric-Gram ops against the full "
                             "product path, interleaved"),
    "clip-breakdown": ("clip_breakdown", "where symmetric CLIP's time goes: clip_loss against "
                                         "info_nce and each kernel op alone"),
    "siglip": ("siglip_targets", "SigLIP against OpenCLIP's materialised formula: time, memory"),
    "momentum": ("momentum_targets", "momentum_update over ResNet-50's parameters against "
                                     "torch._foreach_lerp_"),
    "memory": ("memory_probe", "peak extra memory of fwd+bwd, fused against plain PyTorch, "
                               "each in a fresh process"),
    "contended": ("contended", "the fused losses against plain PyTorch, quiet and beside one "
                               "busy process per core"),
    "objectives": ("objectives_targets", "label smoothing, multiple positives, false-negative "
                                         "filtering, Matryoshka and similarity distillation "
                                         "against the plain fused loss and the materialised "
                                         "formulation"),
    "methods-cpc": ("methods_cpc_run", "CPC on the synthetic speakers: probe, baselines, "
                                       "fused vs reference step"),
    "methods-dim-amdim-cmc": ("methods_dim_amdim_cmc", "Deep InfoMax / AMDIM / CMC: probe, "
                                                       "baselines, fused vs reference step"),
}


def run_script_suite(name, out_dir, script_args):
    """Run SCRIPT_SUITES[name]'s ``main`` with ``--out out_dir`` (when given) and
    ``script_args``; returns its exit status."""
    import importlib

    module_name, _ = SCRIPT_SUITES[name]
    module = importlib.import_module(f"{__package__}.{module_name}")
    argv = list(script_args)
    if out_dir is not None:
        argv = ([out_dir] if name == "methods-cpc" else ["--out", out_dir]) + argv
    status = module.main(argv)
    return status if isinstance(status, int) else 0


MOCO_TARGET = Problem(n=256, d=128, k=65536)
GPU_LARGE = Problem(n=1 << 20, d=256, dtype="bf16", device="cuda")


def cases(suite):
    """[(family, implementation, Problem, skip reason or None)] of a suite, in run order:
    per family, dtype and D, every implementation at each N (smallest N first)."""
    from .runner import Case

    out = []
    for family in suite.families:
        for dtype in suite.dtypes:
            for d in suite.dims:
                for n in suite.sizes:
                    for impl in FAMILIES[family].implementations:
                        if suite.impls is not None and impl not in suite.impls:
                            continue
                        if impl.startswith("compat ") and not suite.twins:
                            continue
                        if suite.fastcontrast_only_above and n > suite.fastcontrast_only_above \
                                and not impl.startswith("fastcontrast"):
                            continue
                        problem = Problem(n=n, d=d, dtype=dtype, device=suite.device)
                        out.append((Case(family, impl, problem, part=suite.part),
                                    suite.skip.get(impl)))
    if suite.name == "large-batch":
        for impl in ("fastcontrast[cpu]", "naive"):
            out.insert(0, (Case("moco", impl, MOCO_TARGET, part="targets"), None))
    if suite.name == "gpu":
        out.append((Case("infonce", "fastcontrast[triton]", GPU_LARGE), None))
    return out


DISTRIBUTED = {"world": 2, "n": 16384, "d": 256, "rounds": 3, "gradcache_n": 8192, "chunk": 512}


def run_distributed(out_dir=None, sizes=None, repeats=None, **options):
    """``fastcontrast bench --suite distributed`` (benchmarks/distributed_targets.py) with the
    DISTRIBUTED settings; ``sizes``: [global batch] instead of its N; ``repeats``: rounds."""
    from .distributed_targets import run_suite

    settings = {**DISTRIBUTED, **options}
    if sizes:
        settings["n"] = sizes[0]
    if repeats:
        settings["rounds"] = repeats
    return run_suite(out_dir=out_dir, **settings)
