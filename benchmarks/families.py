"""The losses the benchmark compares and every implementation of each, on the same inputs.

A family is one loss definition; its implementations must all compute that same value (checked
against fastcontrast's reference before anything is timed). ``n`` always counts the rows of the
similarity matrix, so that time against N means the same work in every family:

    family   loss (tau: temperature)                        inputs (seeded, correlated pairs)
    infonce  mean_i lse_j s_ij - s_ii, s = q^ k^T / 0.07    query, key (N, D), both need grad
    clip     OpenCLIP ClipLoss, logit_scale 1/0.07          image, text (N, D), L2-normalised
    ntxent   SimCLR NT-Xent over N = 2B views, tau 0.5      z1, z2 (B, D)
    supcon   SupCon L_out, tau 0.1, 100 classes             features (N, D), labels (N,)
    moco     MoCo v2: positive q.k, negatives a queue       query (N, D); key (N, D), queue (K, D)
                                                            without grad (momentum encoder)
    siglip   SigLIP sigmoid loss, scale 10, bias -10        image, text (N, D), L2-normalised

Implementations: ``fastcontrast[<backend>]`` (each backend available on the device),
``naive`` (the plain-PyTorch way, materialised logits), ``torch.compile`` (of naive), the
peers (benchmarks/peers.py) and, as ``compat <peer>``, each peer's drop-in twin from
fastcontrast.compat, built and called exactly as the peer is. An implementation's
``products`` counts the N x M x D matrix products it runs, for the achieved GFLOP/s; the
essential ones are the family's (3, or 2 for moco, whose keys need no grad).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import fastcontrast
from fastcontrast.cli.demo import naive_info_nce

from . import peers

NOISE = 1.5  # key i = query i + NOISE * noise: a half-trained model's pairs (as in the demo)
SUPCON_CLASSES = 100
MOCO_QUEUE = 65536


@dataclass(frozen=True)
class Problem:
    """The size of one case: n similarity rows, d features, k queue entries (moco only)."""

    n: int
    d: int
    k: int = 0
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0


DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16,
          "fp16": torch.float16}


@dataclass(frozen=True)
class Implementation:
    """``make(family_options) -> loss(**inputs)``; ``unavailable() -> None | reason``."""

    name: str
    kind: str                      # "fastcontrast" | "baseline" | "peer"
    make: object
    unavailable: object = lambda: None
    recompute: bool = False        # runs the score product again in backward (one more product)
    products: float = None         # N x M x D products run, where not essential (+ recompute)
    warm_full_size: bool = False   # the warm-up must be at the real size (torch.compile)
    peer: str = None               # key into peers.PEERS


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    make_inputs: object            # Problem -> {name: tensor}; leaves needing grad require it
    reference: object              # inputs -> loss (call in float64)
    columns: object                # Problem -> M, the similarity matrix's column count
    essential_products: int = 3
    implementations: dict = field(default_factory=dict)
    enabled: object = lambda: None  # None, or why the family is not in this fastcontrast


# ---------------------------------------------------------------------------------------------
# Inputs


def _generator(problem):
    return torch.Generator().manual_seed(problem.seed)


def _pair(gen, rows, d):
    a = torch.randn(rows, d, generator=gen)
    return a, a + NOISE * torch.randn(rows, d, generator=gen)


def _leaf(t, problem, grad=True, normalize=False):
    if normalize:
        t = F.normalize(t, dim=1)
    t = t.to(device=problem.device, dtype=DTYPES[problem.dtype])
    return t.requires_grad_(grad)


def _pair_inputs(names, normalize):
    def make(problem):
        a, b = _pair(_generator(problem), problem.n, problem.d)
        return {names[0]: _leaf(a, problem, normalize=normalize),
                names[1]: _leaf(b, problem, normalize=normalize)}
    return make


def _ntxent_inputs(problem):
    if problem.n % 2:
        raise ValueError(f"ntxent needs an even number of views N = 2B, got N = {problem.n}")
    z1, z2 = _pair(_generator(problem), problem.n // 2, problem.d)
    return {"z1": _leaf(z1, problem), "z2": _leaf(z2, problem)}


def _supcon_inputs(problem):
    gen = _generator(problem)
    features = torch.randn(problem.n, problem.d, generator=gen)
    labels = torch.randint(0, SUPCON_CLASSES, (problem.n,), generator=gen)
    features = features + 2.0 * torch.randn(SUPCON_CLASSES, problem.d, generator=gen)[labels]
    return {"features": _leaf(features, problem),
            "labels": labels.to(problem.device)}


def _moco_inputs(problem):
    gen = _generator(problem)
    query, key = _pair(gen, problem.n, problem.d)
    queue = torch.randn(problem.k or MOCO_QUEUE, problem.d, generator=gen)
    return {"query": _leaf(query, problem), "key": _leaf(key, problem, grad=False),
            "queue": _leaf(queue, problem, grad=False)}


# ---------------------------------------------------------------------------------------------
# The plain-PyTorch ways of writing each loss (the baselines users start from)

INFONCE_TAU, NTXENT_TAU, SUPCON_TAU, MOCO_TAU = 0.07, 0.5, 0.1, 0.07
CLIP_SCALE, SIGLIP_SCALE, SIGLIP_BIAS = 1 / 0.07, 10.0, -10.0


def naive_clip(image, text):
    """OpenCLIP's ClipLoss written out: mean of CE(image -> text) and CE(text -> image)."""
    logits = CLIP_SCALE * image @ text.T
    labels = torch.arange(image.shape[0], device=image.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def partner_targets(n, device):
    """The positive of view i among the 2B views [z1; z2]: (i + B) mod 2B."""
    return (torch.arange(n, device=device) + n // 2) % n


def naive_ntxent(z1, z2):
    """SimCLR's NT-Xent: cross-entropy over the 2B x 2B cosine logits, self masked out."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = z @ z.T / NTXENT_TAU
    logits = logits.masked_fill(torch.eye(z.shape[0], dtype=torch.bool, device=z.device),
                                float("-inf"))
    return F.cross_entropy(logits, partner_targets(z.shape[0], z.device))


def naive_supcon(features, labels):
    """Khosla et al.'s L_out: mean over positives p of -log softmax_{a != i}(s_i)_p, averaged over
    the anchors that have a positive."""
    z = F.normalize(features, dim=1)
    logits = z @ z.T / SUPCON_TAU
    self_mask = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1,
                                        keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    count = positive.sum(1)
    per_anchor = -(log_prob * positive).sum(1) / count.clamp_min(1)
    return per_anchor.sum() / (count > 0).sum().clamp_min(1)  # 0 when no anchor has a positive


def naive_moco(query, key, queue):
    """The classic MoCo loss: logits = cat([l_pos, q queue^T]) / tau, cross-entropy, label 0."""
    q, k, bank = (F.normalize(t, dim=1) for t in (query, key, queue))
    l_pos = (q * k).sum(1, keepdim=True)
    logits = torch.cat([l_pos, q @ bank.T], dim=1) / MOCO_TAU
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))


def naive_siglip(image, text):
    """SigLIP: -sum_ij log sigmoid(y_ij z_ij) / N, z = scale <image_i, text_j> + bias."""
    logits = SIGLIP_SCALE * image @ text.T + SIGLIP_BIAS
    labels = 2 * torch.eye(image.shape[0], dtype=logits.dtype, device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]


# ---------------------------------------------------------------------------------------------
# fastcontrast's functions


def _fc_infonce(backend):
    return lambda query, key: fastcontrast.info_nce(query, key, temperature=INFONCE_TAU,
                                                    backend=backend)


def _fc_clip(backend):
    return lambda image, text: fastcontrast.clip_loss(image, text, CLIP_SCALE, backend=backend)


def _fc_ntxent(backend):
    return lambda z1, z2: fastcontrast.nt_xent(z1, z2, temperature=NTXENT_TAU, backend=backend)


def _fc_supcon(backend):
    return lambda features, labels: fastcontrast.supcon(features, labels, temperature=SUPCON_TAU,
                                                        backend=backend)


def _fc_moco(backend):
    return lambda query, key, queue: fastcontrast.moco_loss(query, key, queue,
                                                            temperature=MOCO_TAU, backend=backend)


def _fc_siglip(backend):
    return lambda image, text: fastcontrast.siglip_loss(image, text, SIGLIP_SCALE, SIGLIP_BIAS,
                                                        backend=backend)


# ---------------------------------------------------------------------------------------------
# Peers, configured to the family's definition


def _peer_loss(load, key, configure):
    """make() for a peer or its fastcontrast.compat twin: load the class (``load(key)``:
    peers.load_peer or peers.load_twin) and adapt it with ``configure``; both take the same
    constructor and forward arguments, so one ``configure`` serves both."""
    def make():
        cls, reason = load(key)
        if cls is None:
            raise ImportError(reason)
        return configure(cls)
    return make


def _info_nce_pytorch(cls):
    loss = cls(temperature=INFONCE_TAU, reduction="mean")
    return lambda query, key: loss(query, key)


def _open_clip(cls):
    loss = cls()
    return lambda image, text: loss(image, text, torch.tensor(CLIP_SCALE, device=image.device,
                                                              dtype=image.dtype))


def _open_clip_siglip(cls):
    loss = cls(rank=0, world_size=1)

    def run(image, text):
        scale = torch.tensor(SIGLIP_SCALE, device=image.device, dtype=image.dtype)
        bias = torch.tensor(SIGLIP_BIAS, device=image.device, dtype=image.dtype)
        return loss(image, text, scale, bias)
    return run


def _lightly(cls):
    loss = cls(temperature=NTXENT_TAU)
    return lambda z1, z2: loss(z1, z2)


def _pml_ntxent(cls):
    loss = cls(temperature=NTXENT_TAU)

    def run(z1, z2):
        b = z1.shape[0]
        labels = torch.arange(b, device=z1.device).repeat(2)  # view i and i + B share a label
        return loss(torch.cat([z1, z2]), labels)
    return run


def _pml_supcon(cls):
    loss = cls(temperature=SUPCON_TAU)
    return lambda features, labels: loss(features, labels)


def _peer(name, key, configure):
    return Implementation(name, "peer", _peer_loss(peers.load_peer, key, configure),
                          unavailable=lambda: peers.installed(key), peer=key)


def _twin(name, key, configure):
    """The peer's drop-in class from fastcontrast.compat, configured as the peer is."""
    return Implementation(f"compat {name}", "compat",
                          _peer_loss(peers.load_twin, key, configure),
                          unavailable=lambda: peers.load_twin(key)[1])


# ---------------------------------------------------------------------------------------------
# The table

def _baseline(fn):
    return lambda: fn


def _compiled(fn):
    return lambda: torch.compile(fn, dynamic=False)


def _reference_call(function, **options):
    """The family's loss through fastcontrast's reference backend (the oracle)."""
    def reference(**inputs):
        return getattr(fastcontrast, function)(*inputs.values(), **options, backend="reference")
    return reference


def _ntxent_reference(z1, z2):
    return fastcontrast.nt_xent(z1, z2, temperature=NTXENT_TAU, backend="reference")


def _families():
    square = lambda problem: problem.n  # noqa: E731 - N x N similarity
    table = [
        Family("infonce", "InfoNCE (one-directional)", _pair_inputs(("query", "key"), False),
               _reference_call("info_nce", temperature=INFONCE_TAU), square,
               implementations={
                   "naive": (naive_info_nce, None),
                   "info-nce-pytorch": ("info-nce-pytorch", _info_nce_pytorch)},
               ),
        Family("clip", "CLIP symmetric (OpenCLIP ClipLoss)", _pair_inputs(("image", "text"), True),
               _reference_call("clip_loss", logit_scale=CLIP_SCALE), square,
               implementations={"naive": (naive_clip, None),
                                "open_clip ClipLoss": ("open_clip ClipLoss", _open_clip)}),
        Family("ntxent", "NT-Xent (SimCLR), N = 2B views", _ntxent_inputs, _ntxent_reference,
               square, implementations={
                   "naive": (naive_ntxent, None),
                   "lightly NTXentLoss": ("lightly", _lightly),
                   "pml NTXentLoss": ("pml NTXentLoss", _pml_ntxent)}),
        Family("supcon", "SupCon (L_out), 100 classes", _supcon_inputs,
               _reference_call("supcon", temperature=SUPCON_TAU), square,
               implementations={"naive": (naive_supcon, None),
                                "pml SupConLoss": ("pml SupConLoss", _pml_supcon)}),
        Family("moco", "MoCo (queue negatives)", _moco_inputs,
               _reference_call("moco_loss", temperature=MOCO_TAU),
               lambda problem: problem.k or MOCO_QUEUE, essential_products=2,
               implementations={"naive": (naive_moco, None)}),
        Family("siglip", "SigLIP (sigmoid)", _pair_inputs(("image", "text"), True),
               _reference_call("siglip_loss", logit_scale=SIGLIP_SCALE, logit_bias=SIGLIP_BIAS),
               square, implementations={
                   "naive": (naive_siglip, None),
                   "open_clip SigLipLoss": ("open_clip SigLipLoss", _open_clip_siglip)}),
    ]
    fastcontrast_fns = {"infonce": _fc_infonce, "clip": _fc_clip, "ntxent": _fc_ntxent,
                        "supcon": _fc_supcon, "moco": _fc_moco, "siglip": _fc_siglip}
    symmetric = {"clip"}
    # The symmetric-Gram ops (nt_xent, supcon): upper tiles only. CPU: forward 1/2, backward
    # 1/2 (scores) + 1 (both gradient products); Triton: forward 1/2, backward 2 (whole rows).
    gram = {"ntxent": {"cpu": 2.0, "triton": 2.5}, "supcon": {"cpu": 2.0, "triton": 2.5}}
    families = {}
    for family in table:
        impls = {}
        for backend in ("cpu", "torch", "triton"):
            name = f"fastcontrast[{backend}]"
            impls[name] = Implementation(
                name, "fastcontrast", lambda fn=fastcontrast_fns[family.name], b=backend: fn(b),
                unavailable=family.enabled,
                recompute=backend != "cpu" or family.name in symmetric,
                products=gram.get(family.name, {}).get(backend))
        for name, (what, configure) in family.implementations.items():
            if configure is None:
                impls[name] = Implementation(name, "baseline", _baseline(what))
            else:
                impls[name] = _peer(name, what, configure)
                impls[f"compat {name}"] = _twin(name, what, configure)
            if name == "naive":
                impls["torch.compile"] = Implementation("torch.compile", "baseline",
                                                        _compiled(what), warm_full_size=True)
        families[family.name] = Family(family.name, family.title, family.make_inputs,
                                       family.reference, family.columns,
                                       family.essential_products, impls, family.enabled)
    return families


FAMILIES = _families()


def backend_of(impl_name):
    """'fastcontrast[cpu]' -> 'cpu'; None for other implementations."""
    if impl_name.startswith("fastcontrast[") and impl_name.endswith("]"):
        return impl_name[len("fastcontrast["):-1]
    return None


def products_run(family, impl):
    """N x M x D products the implementation runs in one forward+backward."""
    if impl.products is not None:
        return impl.products
    return family.essential_products + (1 if impl.recompute else 0)


def essential_flop(family, problem):
    """The floor's work: the essential products, 2 N M D FLOP each (docs/design.md section 8)."""
    return family.essential_products * 2 * problem.n * family.columns(problem) * problem.d


def unavailable(family, impl, device):
    """None if ``impl`` of ``family`` can run on ``device`` here, else the reason (no import of
    a peer: that happens, with its own reasons, in the worker)."""
    reason = family.enabled() or impl.unavailable()
    if reason is not None:
        return reason
    backend = backend_of(impl.name)
    if backend is None:
        return None
    if backend == "triton" and torch.device(device).type != "cuda":
        return "the triton backend is benchmarked on CUDA only (Triton's CPU interpreter is a " \
               "test tool)"
    if backend == "cpu" and torch.device(device).type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {device}"
    if backend == "torch":
        return None  # pure PyTorch: runs anywhere (and asking would load the C++ extension)
    if backend not in fastcontrast.available_backends(device):
        return f"backend {backend!r} is not available on {device} here " \
               f"(available: {', '.join(fastcontrast.available_backends(device))})"
    return None


def build(family, impl, device):
    """(the implementation's loss function, None), or (None, why it cannot run here): the
    checks of ``unavailable``, then the import of a peer (benchmarks/peers.py)."""
    reason = unavailable(family, impl, device)
    if reason is not None:
        return None, reason
    try:
        return impl.make(), None
    except ImportError as error:
        return None, str(error)
