"""Workers of the distributed loss tests: W gloo processes on 127.0.0.1 run every case of
``CASES`` in both modes and write what they measured (relative errors against the
single-process losses on the concatenated batch, or error messages) to one JSON file per rank;
the pytest functions in test_distributed_losses.py assert on those files.

``run_world`` spawns once (4 processes run W = 4, 2 and 1, see _main) and always returns:
the process group has a short timeout (every collective fails instead of hanging) and
processes still alive at the deadline are killed.

What a case checks, per mode, in float64 against the single-process function (the oracle,
backend="reference") on the concatenated batch:
    mean/loss     |mean over ranks of the returned losses - single-process loss|
    mean/<input>  each rank's input gradient vs W x the single-process gradient of its shard
    mean/<scalar> the DDP average (mean over ranks) of the scalar gradient vs single-process
    sum/loss      reduction="sum": mean over ranks of the returned losses vs the total
    rows/...      reduction="none" with random per-row upstream weights (different on every
                  rank): the gradients of sum_i w_i loss_i (scalars: summed over ranks)
    agree/...     gather and ring give the same losses and gradients
"""
import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_S = 30          # of every collective (init_process_group(timeout=...))
SIZES = (3, 5, 2, 4)     # rows of ranks 0..3: uneven on purpose
DIM = 6
BACKEND = "torch"        # the fused kernels that need no compiler
MODES = ("gather", "ring")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world, out_dir, deadline_s=360):
    """Spawn ``world`` workers, wait at most ``deadline_s`` (a safety net for a loaded machine:
    every collective already fails after TIMEOUT_S), return the ranks' result dicts."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    if sys.platform.startswith("linux") and "GLOO_SOCKET_IFNAME" not in os.environ:
        env["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # the children read it at start; the test process gets it back
    try:
        ctx = mp.start_processes(_main, args=(world, str(out_dir)), nprocs=world, join=False,
                                 start_method="spawn")
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    deadline = time.monotonic() + deadline_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed workers (W = {world}) still running after "
                                   f"{deadline_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    results = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            results.append(json.load(f))
    return results


# ---------------------------------------------------------------------------------------------
# Data and cases


def _rows(sizes, factor=1):
    """Slices of the global rows of each rank (``factor`` rows per sample)."""
    out, start = [], 0
    for size in sizes:
        out.append(slice(start, start + factor * size))
        start += factor * size
    return out


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


class Case:
    """build(gen, sizes) -> (globals: name -> tensor, shards: name -> list of per-rank slices
    (None: replicated), differentiable names); dist(local, reduction, mode, group) and
    ref(globals, reduction) -> loss; none_rows(sizes, rank) -> global indices of the rank's
    reduction="none" rows."""

    def __init__(self, name, build, dist_fn, ref_fn, none_rows=None):
        self.name, self.build, self.dist, self.ref = name, build, dist_fn, ref_fn
        self.none_rows = none_rows or (lambda sizes, r: torch.arange(
            sum(sizes[:r]), sum(sizes[:r + 1])))


def _case_list(backend=BACKEND):
    """(cases, filter builders) with the distributed calls on ``backend``."""
    import fastcontrast as fc
    from fastcontrast import distributed as fcd

    ref = dict(backend="reference")
    dst = dict(backend=backend)
    cases = []

    def pair(gen, sizes, keys_per_row=1):
        n = sum(sizes)
        g = {"query": _randn(gen, n, DIM), "key": _randn(gen, keys_per_row * n, DIM) * 1.3,
             "tau": torch.tensor(0.31, dtype=torch.float64)}
        return g, {"query": _rows(sizes), "key": _rows(sizes, keys_per_row), "tau": None}

    def plain(gen, sizes):
        g, s = pair(gen, sizes)
        return g, s, ("query", "key", "tau")

    cases.append(Case(
        "info_nce", plain,
        lambda x, red, mode, grp: fcd.info_nce(x["query"], x["key"], temperature=x["tau"],
                                               reduction=red, mode=mode, group=grp, **dst),
        lambda x, red: fc.info_nce(x["query"], x["key"], temperature=x["tau"], reduction=red,
                                   **ref)))

    def targets(gen, sizes):
        g, s = pair(gen, sizes, keys_per_row=2)
        n = sum(sizes)
        g["targets"] = torch.randint(0, 2 * n, (n,), generator=gen)
        s["targets"] = _rows(sizes)
        return g, s, ("query", "key", "tau")

    cases.append(Case(
        "info_nce_global_targets", targets,
        lambda x, red, mode, grp: fcd.info_nce(x["query"], x["key"], temperature=x["tau"],
                                               targets=x["targets"], reduction=red, mode=mode,
                                               group=grp, **dst),
        lambda x, red: fc.info_nce(x["query"], x["key"], temperature=x["tau"],
                                   targets=x["targets"], reduction=red, **ref)))

    def exclude_self(gen, sizes):
        g, s = pair(gen, sizes)
        n = sum(sizes)
        g["targets"] = (torch.arange(n) + torch.randint(1, n, (n,), generator=gen)) % n
        s["targets"] = _rows(sizes)
        return g, s, ("query", "key", "tau")

    cases.append(Case(
        "info_nce_exclude_self", exclude_self,
        lambda x, red, mode, grp: fcd.info_nce(x["query"], x["key"], temperature=x["tau"],
                                               targets=x["targets"], exclude_self=True,
                                               reduction=red, mode=mode, group=grp, **dst),
        lambda x, red: fc.info_nce(x["query"], x["key"], temperature=x["tau"],
                                   targets=x["targets"], exclude_self=True, reduction=red,
                                   **ref)))

    def bank(gen, sizes):
        g, s = pair(gen, sizes)
        bank_sizes = [2, 1, 3, 2][:len(sizes)]
        g["bank"] = _randn(gen, sum(bank_sizes), DIM)
        s["bank"] = _rows(bank_sizes)
        return g, s, ("query", "key", "bank", "tau")

    for in_batch in (True, False):
        cases.append(Case(
            f"info_nce_bank_in_batch_{in_batch}", bank,
            lambda x, red, mode, grp, ib=in_batch: fcd.info_nce(
                x["query"], x["key"], x["bank"], temperature=x["tau"], in_batch_negatives=ib,
                reduction=red, mode=mode, group=grp, **dst),
            lambda x, red, ib=in_batch: fc.info_nce(
                x["query"], x["key"], x["bank"], temperature=x["tau"], in_batch_negatives=ib,
                reduction=red, **ref)))

    def per_query(gen, sizes):
        g, s = pair(gen, sizes)
        g["negatives"] = _randn(gen, sum(sizes), 3, DIM)
        s["negatives"] = _rows(sizes)
        return g, s, ("query", "key", "negatives", "tau")

    cases.append(Case(
        "info_nce_per_query_negatives", per_query,
        lambda x, red, mode, grp: fcd.info_nce(x["query"], x["key"], x["negatives"],
                                               temperature=x["tau"], reduction=red, mode=mode,
                                               group=grp, **dst),
        lambda x, red: fc.info_nce(x["query"], x["key"], x["negatives"], temperature=x["tau"],
                                   reduction=red, **ref)))

    def far_targets(gen, sizes):
        g, s, diff = per_query(gen, sizes)
        n = sum(sizes)
        g["targets"] = torch.randint(0, n, (n,), generator=gen)
        s["targets"] = _rows(sizes)
        return g, s, diff

    cases.append(Case(  # the positive from another rank, outside the fused product
        "info_nce_no_in_batch_global_targets", far_targets,
        lambda x, red, mode, grp: fcd.info_nce(x["query"], x["key"], x["negatives"],
                                               temperature=x["tau"], targets=x["targets"],
                                               in_batch_negatives=False, reduction=red,
                                               mode=mode, group=grp, **dst),
        lambda x, red: fc.info_nce(x["query"], x["key"], x["negatives"], temperature=x["tau"],
                                   targets=x["targets"], in_batch_negatives=False,
                                   reduction=red, **ref)))

    cases.append(Case(
        "info_nce_symmetric", plain,
        lambda x, red, mode, grp: fcd.info_nce(x["query"], x["key"], temperature=x["tau"],
                                               symmetric=True, reduction=red, mode=mode,
                                               group=grp, **dst),
        lambda x, red: fc.info_nce(x["query"], x["key"], temperature=x["tau"], symmetric=True,
                                   reduction=red, **ref)))

    def noncontiguous(t):
        return t.t().contiguous().t() if t.dim() == 2 else t

    cases.append(Case(
        "info_nce_symmetric_noncontiguous", plain,
        lambda x, red, mode, grp: fcd.info_nce(
            noncontiguous(x["query"]), noncontiguous(x["key"])[:, :], temperature=x["tau"],
            symmetric=True, reduction=red, mode=mode, group=grp, **dst),
        lambda x, red: fc.info_nce(x["query"], x["key"], temperature=x["tau"], symmetric=True,
                                   reduction=red, **ref)))

    def clip(gen, sizes):
        g, s = pair(gen, sizes)
        g["scale"] = torch.tensor(2.7, dtype=torch.float64)
        g["bias"] = torch.tensor(-0.5, dtype=torch.float64)
        s.update(scale=None, bias=None)
        del g["tau"], s["tau"]
        return g, s, ("query", "key", "scale", "bias")

    cases.append(Case(
        "clip_loss", clip,
        lambda x, red, mode, grp: fcd.clip_loss(x["query"], x["key"], x["scale"],
                                                logit_bias=x["bias"], reduction=red, mode=mode,
                                                group=grp, **dst),
        lambda x, red: fc.clip_loss(x["query"], x["key"], x["scale"], logit_bias=x["bias"],
                                    reduction=red, **ref)))
    cases.append(Case(
        "siglip_loss", clip,
        lambda x, red, mode, grp: fcd.siglip_loss(x["query"], x["key"], x["scale"], x["bias"],
                                                  reduction=red, mode=mode, group=grp, **dst),
        lambda x, red: fc.siglip_loss(x["query"], x["key"], x["scale"], x["bias"],
                                      reduction=red, **ref)))

    cases.append(Case(
        "nt_xent", plain,
        lambda x, red, mode, grp: fcd.nt_xent(x["query"], x["key"], temperature=x["tau"],
                                              reduction=red, mode=mode, group=grp, **dst),
        lambda x, red: fc.nt_xent(x["query"], x["key"], temperature=x["tau"], reduction=red,
                                  **ref), none_rows=_nt_xent_rows))

    def labelled(gen, sizes):
        g, s = pair(gen, sizes)
        n = sum(sizes)
        labels = torch.randint(0, 3, (n,), generator=gen)
        labels[n // 2] = 99  # an anchor without a positive (left out of the mean)
        g["labels"] = labels
        s["labels"] = _rows(sizes)
        return g, s, ("query", "tau")

    cases.append(Case(
        "supcon", labelled,
        lambda x, red, mode, grp: fcd.supcon(x["query"], x["labels"], temperature=x["tau"],
                                             reduction=red, mode=mode, group=grp, **dst),
        lambda x, red: fc.supcon(x["query"], x["labels"], temperature=x["tau"], reduction=red,
                                 **ref)))

    def views(gen, sizes):
        n = sum(sizes)
        g = {"features": _randn(gen, n, 2, DIM), "tau": torch.tensor(0.2, dtype=torch.float64)}
        return g, {"features": _rows(sizes), "tau": None}, ("features", "tau")

    cases.append(Case(
        "supcon_multiview", views,
        lambda x, red, mode, grp: fcd.supcon(x["features"], temperature=x["tau"], reduction=red,
                                             mode=mode, group=grp, **dst),
        lambda x, red: fc.supcon(x["features"], temperature=x["tau"], reduction=red, **ref)))

    def moco(gen, sizes):
        g, s = pair(gen, sizes)
        g["queue"] = _randn(gen, 9, DIM)
        s["queue"] = None
        return g, s, ("query", "key", "tau")

    cases.append(Case(
        "moco_loss", moco,
        lambda x, red, mode, grp: fcd.moco_loss(x["query"], x["key"], x["queue"],
                                                temperature=x["tau"], reduction=red, mode=mode,
                                                group=grp, **dst),
        lambda x, red: fc.moco_loss(x["query"], x["key"], x["queue"], temperature=x["tau"],
                                    reduction=red, **ref)))
    objective_cases, builders = _objective_cases(fc, fcd, ref, dst, plain, targets, bank, pair)
    cases += objective_cases
    from ._label_smoothing_cases import label_smoothing_cases
    cases += label_smoothing_cases(fc, fcd, ref, dst, dict(builders, plain=plain,
                                                           targets=targets, clip=clip))
    from ._matryoshka_cases import matryoshka_cases
    from ._multi_positive_cases import multi_positive_cases
    more = dict(builders, plain=plain, targets=targets, clip=clip, bank=bank)
    cases += multi_positive_cases(fc, fcd, ref, dst, more)
    cases += matryoshka_cases(fc, fcd, ref, dst, more)
    from ._false_negative_cases import false_negative_cases
    filter_cases = false_negative_cases(fc, fcd, ref, dst, more)
    cases += [c.case for c in filter_cases]
    from ._distill_cases import distill_cases
    cases += distill_cases(fc, fcd, ref, dst, dict(plain=plain, targets=targets))
    return cases, filter_cases


def _objective_cases(fc, fcd, ref, dst, plain, targets, bank, pair):
    """DCL / DCLW / HCL and the id masks: the same options on both sides."""
    cases = []

    def both(name, build, **options):
        cases.append(Case(
            name, build,
            lambda x, red, mode, grp: fcd.info_nce(
                x["query"], x["key"], x.get("bank"), temperature=x["tau"],
                targets=x.get("targets"), reduction=red, mode=mode, group=grp,
                **_ids(x, options), **dst),
            lambda x, red: fc.info_nce(x["query"], x["key"], x.get("bank"), temperature=x["tau"],
                                       targets=x.get("targets"), reduction=red,
                                       **_ids(x, options), **ref)))

    def ids(gen, sizes):  # ids in [0, 3): some bank entries share the query's id
        g, s, diff = bank(gen, sizes)
        n = sum(sizes)
        g["query_ids"] = torch.randint(0, 3, (n,), generator=gen)
        s["query_ids"] = _rows(sizes)
        g["negative_ids"] = torch.randint(0, 3, (g["bank"].shape[0],), generator=gen)
        s["negative_ids"] = _rows([2, 1, 3, 2][:len(sizes)])
        return g, s, diff

    both("info_nce_dcl", plain, decoupled=True)
    both("info_nce_dclw", plain, decoupled=True, dclw_sigma=0.5)
    both("info_nce_hcl_bank", bank, hcl_beta=0.5, hcl_tau_plus=0.1)
    both("info_nce_hcl_dcl_global_targets", targets, decoupled=True, hcl_tau_plus=0.05)
    both("info_nce_ids_dcl_bank_only", ids, decoupled=True, in_batch_negatives=False)
    both("info_nce_ids_hcl", ids, hcl_beta=0.3, in_batch_negatives=False)
    both("info_nce_ids_in_batch", ids)
    both("info_nce_ids_hcl_in_batch", ids, hcl_beta=0.3, hcl_tau_plus=0.1)

    cases.append(Case(
        "nt_xent_hcl_dcl", plain,
        lambda x, red, mode, grp: fcd.nt_xent(x["query"], x["key"], temperature=x["tau"],
                                              decoupled=True, hcl_beta=0.4, reduction=red,
                                              mode=mode, group=grp, **dst),
        lambda x, red: fc.nt_xent(x["query"], x["key"], temperature=x["tau"], decoupled=True,
                                  hcl_beta=0.4, reduction=red, **ref),
        none_rows=_nt_xent_rows))

    def moco_ids(gen, sizes):
        g, s = pair(gen, sizes)
        n = sum(sizes)
        g["queue"], s["queue"] = _randn(gen, 9, DIM), None
        g["queue_ids"], s["queue_ids"] = torch.randint(0, 3, (9,), generator=gen), None
        g["query_index"] = torch.randint(0, 3, (n,), generator=gen)
        s["query_index"] = _rows(sizes)
        return g, s, ("query", "key", "tau")

    cases.append(Case(
        "moco_loss_hcl_query_index", moco_ids,
        lambda x, red, mode, grp: fcd.moco_loss(
            x["query"], x["key"], _queue(x), temperature=x["tau"], reduction=red,
            query_index=x["query_index"], hcl_beta=0.5, decoupled=True, mode=mode, group=grp,
            **dst),
        lambda x, red: fc.moco_loss(x["query"], x["key"], _queue(x), temperature=x["tau"],
                                    reduction=red, query_index=x["query_index"], hcl_beta=0.5,
                                    decoupled=True, **ref)))
    return cases, {"ids": ids, "moco": moco_ids}


def _nt_xent_rows(sizes, r):
    """The global rows of rank r's [z1_r; z2_r] in the single-process [z1; z2]."""
    n, off = sum(sizes), sum(sizes[:r])
    local = torch.arange(off, off + sizes[r])
    return torch.cat([local, local + n])


def _ids(x, options):
    out = dict(options)
    if "query_ids" in x:
        out.update(query_ids=x["query_ids"], negative_ids=x["negative_ids"])
    return out


def _queue(x):
    from fastcontrast import NegativeQueue

    queue = NegativeQueue(x["queue"].shape[0], DIM, dtype=x["queue"].dtype, store_indices=True)
    queue.enqueue(x["queue"], indices=x["queue_ids"])
    return queue


# ---------------------------------------------------------------------------------------------
# Running the cases


def _err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) / max(1.0, float(b.abs().max())) if a.numel() else 0.0


def _gather_scalar(value, group):
    t = torch.as_tensor(value, dtype=torch.float64).detach().reshape(1)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t, group=group)
    return torch.cat(out)


def _local(glob, shards, differentiable, rank, dtype=None):
    """This rank's shard of every input (floating ones cast to ``dtype`` where given)."""
    out = {}
    for name, t in glob.items():
        part = t if shards[name] is None else t[shards[name][rank]]
        part = part.clone() if dtype is None or not part.is_floating_point() else part.to(dtype)
        if name in differentiable:
            part.requires_grad_(True)
        out[name] = part
    return out


def _leaf_copy(glob, differentiable):
    return {k: (v.clone().requires_grad_(True) if k in differentiable else v)
            for k, v in glob.items()}


def _grads(tensors, names):
    return {n: (torch.zeros_like(tensors[n]) if tensors[n].grad is None else tensors[n].grad)
            for n in names}


def run_case(case, group, seed, out, tag="", dtype=None):
    """All checks of one case in the process group ``group``; results into ``out``. ``dtype``:
    the distributed call's inputs in that dtype (the reference stays float64)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = SIZES[:world]
    gen = torch.Generator().manual_seed(seed)
    glob, shards, differentiable = case.build(gen, sizes)
    if dtype is not None:  # the reference sees the inputs the cast call gets, in float64
        glob = {k: v.to(dtype).to(v.dtype) if v.is_floating_point() else v
                for k, v in glob.items()}
    weights = torch.rand(2 * sum(sizes), generator=gen, dtype=torch.float64) + 0.5
    key = f"{tag}{case.name}"
    seen = {}
    for mode in MODES:
        for variant in ("mean", "rows"):
            prefix = f"{key}/{mode}/{variant}"
            try:
                red = "mean" if variant == "mean" else "none"
                local = _local(glob, shards, differentiable, rank, dtype)
                full = _leaf_copy(glob, differentiable)
                loss = case.dist(local, red, mode, group)
                reference = case.ref(full, red)
                if variant == "mean":
                    total = case.dist(local, "sum", mode, group).detach()
                    out[f"{key}/{mode}/sum/loss"] = _err(_gather_scalar(total, group).mean(),
                                                         case.ref(full, "sum").detach())
                    loss.backward()
                    reference.backward()
                    out[f"{prefix}/loss"] = _err(_gather_scalar(loss, group).mean(), reference)
                    factor = world
                else:
                    rows = case.none_rows(sizes, rank)
                    flat_ref = reference.reshape(reference.shape[0], -1)
                    w = weights[:flat_ref.numel()].reshape(flat_ref.shape)
                    out[f"{prefix}/loss"] = _err(loss.reshape(len(rows), -1), flat_ref[rows])
                    (loss.reshape(len(rows), -1) * w[rows]).sum().backward()
                    (flat_ref * w).sum().backward()
                    factor = 1
                got, want = _grads(local, differentiable), _grads(full, differentiable)
                for name in differentiable:
                    if shards[name] is None:  # a scalar: DDP averages, "rows" sums the ranks
                        total = _gather_scalar(got[name], group)
                        value = total.mean() if variant == "mean" else total.sum()
                        out[f"{prefix}/{name}"] = _err(value, want[name])
                    else:
                        out[f"{prefix}/{name}"] = _err(got[name],
                                                       factor * want[name][shards[name][rank]])
                seen[(mode, variant)] = [loss.detach()] + [got[n] for n in differentiable]
            except Exception:  # noqa: BLE001  (reported to the test, which fails on it)
                out[f"{prefix}/error"] = traceback.format_exc()
    for variant in ("mean", "rows"):
        a, b = seen.get(("gather", variant)), seen.get(("ring", variant))
        if a is not None and b is not None:
            out[f"{key}/agree/{variant}"] = max(_err(x, y) for x, y in zip(a, b))


def run_all_gather_with_grad(group, out, tag):
    from fastcontrast import distributed as fcd

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = SIZES[:world]
    gen = torch.Generator().manual_seed(7)
    x_all = _randn(gen, sum(sizes), DIM)
    coef = _randn(gen, world, sum(sizes), DIM)  # rank r's loss: sum(gathered * coef[r])
    x = x_all[_rows(sizes)[rank]].clone().requires_grad_(True)
    gathered = fcd.all_gather_with_grad(x, group=group)
    out[f"{tag}all_gather_with_grad/forward"] = _err(gathered, x_all)
    (gathered * coef[rank]).sum().backward()
    out[f"{tag}all_gather_with_grad/backward"] = _err(x.grad, coef.sum(0)[_rows(sizes)[rank]])


def run_enqueue_all(group, out, tag):
    from fastcontrast import NegativeQueue
    from fastcontrast import distributed as fcd

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = SIZES[:world]
    gen = torch.Generator().manual_seed(8)
    mine, single = (NegativeQueue(11, DIM, dtype=torch.float64, store_indices=True)
                    for _ in range(2))
    for step in range(2):
        keys = _randn(gen, sum(sizes), DIM)
        ids = torch.arange(sum(sizes)) + 100 * step
        part = _rows(sizes)[rank]
        fcd.enqueue_all(mine, keys[part], indices=ids[part], group=group)
        single.enqueue(keys, indices=ids)
    out[f"{tag}enqueue_all/keys"] = _err(mine.keys, single.keys)
    out[f"{tag}enqueue_all/indices"] = _err(mine.indices, single.indices)
    out[f"{tag}enqueue_all/pointer"] = _err(mine.pointer, single.pointer)


def run_bad_inputs(group, out, tag):
    """Mismatched D and dtype across ranks: a clear ValueError on every rank, not a hang."""
    from fastcontrast import distributed as fcd

    rank = dist.get_rank(group)
    d = DIM + rank  # rank-dependent D
    q, k = torch.randn(3, d, dtype=torch.float64), torch.randn(3, d, dtype=torch.float64)
    for mode in MODES:
        try:
            fcd.info_nce(q, k, mode=mode, group=group, backend=BACKEND)
            out[f"{tag}bad/dim/{mode}"] = "no error"
        except ValueError as e:
            out[f"{tag}bad/dim/{mode}"] = str(e)
    try:  # clip_loss's errors name its own arguments
        fcd.clip_loss(q, k, 2.0, group=group, backend=BACKEND)
        out[f"{tag}bad/dim/clip"] = "no error"
    except ValueError as e:
        out[f"{tag}bad/dim/clip"] = str(e)
    # Matryoshka on rank 0 only, with the one prefix D (the same feature shapes everywhere):
    # ring mode makes one call per prefix, so the prefixes must be agreed on, not inferred.
    q, k = torch.randn(3, DIM, dtype=torch.float64), torch.randn(3, DIM, dtype=torch.float64)
    prefixes = dict(matryoshka_dims=(DIM,), matryoshka_weights=(2.0,)) if rank == 0 else {}
    for mode in MODES:
        try:
            fcd.info_nce(q, k, mode=mode, group=group, backend=BACKEND, **prefixes)
            out[f"{tag}bad/matryoshka/{mode}"] = "no error"
        except ValueError as e:
            out[f"{tag}bad/matryoshka/{mode}"] = str(e)
    dtype = torch.float64 if rank == 0 else torch.float32
    q, k = torch.randn(3, DIM, dtype=dtype), torch.randn(3, DIM, dtype=dtype)
    try:
        fcd.clip_loss(q, k, 2.0, group=group, backend=BACKEND)
        out[f"{tag}bad/dtype"] = "no error"
    except ValueError as e:
        out[f"{tag}bad/dtype"] = str(e)
    # Refused on the last rank only (an empty batch, a bad temperature, out-of-range targets,
    # a bad queue): every rank raises (the last its own error), none waits for it in a
    # collective. Ring mode with uneven non-empty batches works (every case above runs SIZES).
    last = rank == dist.get_world_size(group) - 1
    n = 0 if last else 3
    calls = {
        "empty": lambda mode: fcd.clip_loss(torch.randn(n, DIM), torch.randn(n, DIM), 2.0,
                                            group=group, mode=mode, backend=BACKEND),
        "empty_nt_xent": lambda mode: fcd.nt_xent(torch.randn(n, DIM), torch.randn(n, DIM),
                                                  group=group, mode=mode, backend=BACKEND),
        "temperature_nt_xent": lambda mode: fcd.nt_xent(
            torch.randn(3, DIM), torch.randn(3, DIM), temperature=-1.0 if last else 0.5,
            group=group, mode=mode, backend=BACKEND),
        "targets": lambda mode: fcd.info_nce(
            torch.randn(3, DIM), torch.randn(3, DIM), mode=mode, group=group, backend=BACKEND,
            targets=torch.full((3,), 100 if last else 0)),
        "queue": lambda mode: fcd.moco_loss(
            torch.randn(3, DIM), torch.randn(3, DIM), torch.randn(4, DIM + int(last)),
            mode=mode, group=group, backend=BACKEND)}
    for what, call in calls.items():
        for mode in MODES:
            try:
                call(mode)
                out[f"{tag}bad/{what}/{mode}"] = "no error"
            except ValueError as e:
                out[f"{tag}bad/{what}/{mode}"] = ("last: " if last else "other: ") + str(e)


def _run_all(group, out, tag, seed, cases, extras=True):
    from ._false_negative_cases import run_dropped_counts

    cases, filter_cases = cases
    for i, case in enumerate(cases):
        run_case(case, group, seed=seed + i, out=out, tag=tag)
    run_dropped_counts(group, out, tag, filter_cases, seed + 500)
    if not extras:
        return
    from ._ring_probe import run_ring_probe

    for fn in (run_all_gather_with_grad, run_enqueue_all, run_bad_inputs, run_ring_probe):
        try:
            fn(group, out, tag)
        except Exception:  # noqa: BLE001
            out[f"{tag}{fn.__name__}/error"] = traceback.format_exc()


def _main(rank, world, out_dir):
    """One spawn of 4 processes runs all three world sizes: W = 4 on the default group, W = 2
    on the subgroups {0, 2} and {1, 3} (group ranks differ from global ranks; the two groups
    run at once on different data), W = 1 on the group {0}. Keys are prefixed "w{W}/"."""
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=timedelta(seconds=TIMEOUT_S))
    torch.set_num_threads(1)
    out = {}
    timeout = timedelta(seconds=TIMEOUT_S)
    try:
        cases = _case_list()
        _run_all(None, out, f"w{world}/", 1000, cases)
        if world == 4:
            from ._backend_cases import run_backend_cases

            run_backend_cases(None, out, f"w{world}/")
            pairs = [dist.new_group([0, 2], timeout=timeout),
                     dist.new_group([1, 3], timeout=timeout)]
            _run_all(pairs[rank % 2], out, "w2/", 2000 + 100 * (rank % 2), cases)
            single = dist.new_group([0], timeout=timeout)
            if rank == 0:
                _run_all(single, out, "w1/", 3000, cases, extras=False)
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(out, f)
        dist.destroy_process_group()
