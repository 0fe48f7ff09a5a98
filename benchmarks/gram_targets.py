"""Symmetric-Gram targets on CPU: nt_xent and supcon forward+backward on the
symmetric-Gram ops against the full-product path (the gram setting off, FASTCONTRAST_GRAM=0),
interleaved in one run.

    python -m benchmarks.gram_targets --out OUT_DIR [--rows 16384] [--dim 256] [--repeats 5]

``rows`` is 2N for nt_xent (two views of N) and the batch of supcon. Every implementation runs
once per round, the order rotated from round to round (fastcontrast.cli.measure.time_interleaved);
medians, and the median over rounds of the paired ratio gram / full. The floor is 6 rows^2 D FLOP
(the full product's scores, dQ and dK) at the best warm torch.mm rate over the product shapes the
kernels issue: those of csrc/cpu/infonce.cpp's fused path (benchmarks/_floor.py) and those of
csrc/cpu/gram.cpp's pair tiles (B x B x D, B ~ sqrt(4 MiB / 4), the halves and the shorter
last block; measured at the call's thread count, though the kernel runs them one thread a tile); the
fastest shape is timed again in every round beside the losses, and so is the fastest pair-tile
product run as the kernel runs them (one thread a tile, all threads at once: the strict floor is
the faster of the two in each round). Targets: gram at most 0.75x the full path and at most 0.8x
both floors. Writes gram_targets.json and summary.md.
"""
import argparse
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import fastcontrast
from fastcontrast._config import override
from fastcontrast.cli.measure import machine_info, paired_ratio, summarize, time_interleaved

try:
    from . import _floor
except ImportError:  # run as a script: this folder is on sys.path
    import _floor

TARGET_VS_FULL = 0.75
TARGET_VS_FLOOR = 0.8
TEMPERATURE = 0.1


def _inputs(rows, dim, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, dim, generator=gen)
    labels = torch.randint(0, max(1, rows // 8), (rows,), generator=gen)  # ~8 per class
    return z, labels


def _loss(name, z, labels):
    if name == "nt_xent":
        half = z.shape[0] // 2
        return fastcontrast.nt_xent(z[:half], z[half:], temperature=TEMPERATURE, backend="cpu")
    return fastcontrast.supcon(z, labels, temperature=TEMPERATURE, backend="cpu")


def _step(name, gram, z, labels):
    """One forward+backward of loss `name` on the Gram path (or the full product)."""
    def run():
        with override(gram=gram):
            x = z.detach().requires_grad_(True)
            _loss(name, x, labels).backward()
    return run


def _check_agreement(name, z, labels):
    """The two paths give the same loss and gradient (fp32 round-off) before any timing."""
    out = {}
    for gram in (False, True):
        with override(gram=gram):
            x = z.detach().requires_grad_(True)
            loss = _loss(name, x, labels)
            loss.backward()
        out[gram] = (float(loss.detach()), x.grad)
    grad_err = float((out[True][1] - out[False][1]).abs().max() / out[False][1].abs().max())
    loss_err = abs(out[True][0] - out[False][0]) / abs(out[False][0])
    assert loss_err < 1e-4 and grad_err < 1e-3, (name, loss_err, grad_err)
    return {"loss_rel_diff": loss_err, "grad_rel_diff": grad_err}


PAIR_TILE_BYTES = 4 << 20  # csrc/cpu/gram.cpp's kPairTileBytes


def _pair_block(rows, threads, elem_size=4):
    """csrc/cpu/gram.cpp's pair_block: a square tile of ~4 MiB, halved (down to 128) until a
    round of block pairs has a pair for every thread."""
    block = int((PAIR_TILE_BYTES // elem_size) ** 0.5) // 16 * 16
    while block > 128 and -(-rows // block) < 2 * threads:
        block = max(128, block // 2 // 16 * 16)
    return min(block, rows)


def _gram_products(rows, dim, threads):
    """Product shapes of csrc/cpu/gram.cpp's pair tiles: blocks of B rows (the last one
    shorter), each tile (K x Q) = z_keys @ z_queries^T, dz_queries += tile^T @ z_keys and, off
    the diagonal, dz_keys += tile @ z_queries; a diagonal block runs as tiles of its halves."""
    block = _pair_block(rows, threads)
    sizes = {block, rows % block} - {0}
    sizes |= {size // 2 for size in sizes} | {size - size // 2 for size in sizes}
    gen = torch.Generator().manual_seed(1)
    steps = {}
    for k_rows in sorted(s for s in sizes if s > 0):
        for q_rows in sorted({k_rows, block} & sizes):
            q = torch.randn(q_rows, dim, generator=gen)
            k = torch.randn(k_rows, dim, generator=gen)
            tile = torch.randn(k_rows, q_rows, generator=gen)
            dq, dk = torch.zeros(q_rows, dim), torch.zeros(k_rows, dim)
            shape = (q_rows, k_rows, dim)
            steps[f"gram scores {k_rows} x {q_rows} x {dim}"] = (
                shape, lambda k=k, q=q, tile=tile: torch.mm(k, q.T, out=tile))
            steps[f"gram dz_queries {q_rows} x {k_rows} x {dim}"] = (
                shape, lambda dq=dq, tile=tile, k=k: dq.addmm_(tile.T, k))
            steps[f"gram dz_keys {k_rows} x {q_rows} x {dim}"] = (
                shape, lambda dk=dk, tile=tile, q=q: dk.addmm_(tile, q))
    return steps


def _rate(flop, step, repeats):
    """Warm GFLOP/s of step (median of `repeats` timings)."""
    step()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    return flop / sorted(samples)[len(samples) // 2] / 1e9


def _product_rates(rows, dim, repeats):
    """{product name: (shape, step, warm GFLOP/s)} over the kernels' product shapes."""
    steps = {}
    for product in _floor.kernel_products(rows, rows, dim, backends=("cpu",)):
        steps[_floor.product_name(product)] = (product[2:], _floor.product_step(product))
    steps.update(_gram_products(rows, dim, torch.get_num_threads()))
    out = {}
    for name, (shape, step) in steps.items():
        flop = _floor.matmul_flop(*shape)
        times = max(1, int(2e9 // flop))  # ~ a tenth of a second per sample
        out[name] = (shape, step, _rate(flop * times, _floor.repeated(step, times), repeats))
    return out


def _concurrent_steps(rows, dim, threads):
    """({name: (flop, step)}, pool): the pair-tile products run as csrc/cpu/gram.cpp runs them,
    `threads` products at once on `pool`, one torch thread each (each on its own operands),
    repeated to ~1 s of work counted together. A floor at the 2-thread torch.mm rate alone would
    be too low where this is faster. The caller shuts `pool` down."""
    block = _pair_block(rows, threads)
    gen = torch.Generator().manual_seed(2)

    def operands():
        return (torch.randn(block, dim, generator=gen), torch.randn(block, dim, generator=gen),
                torch.randn(block, block, generator=gen), torch.zeros(block, dim))

    kinds = {"scores": lambda k, q, t, o: torch.mm(k, q.T, out=t),
             "dz_queries": lambda k, q, t, o: o.addmm_(t.T, k),
             "dz_keys": lambda k, q, t, o: o.addmm_(t, q)}
    flop = _floor.matmul_flop(block, block, dim)
    times = max(1, int(2.5e11 // (threads * flop)))  # ~1 s at ~250 GFLOP/s, as the floor step
    pool = ThreadPoolExecutor(threads)
    steps = {}
    for kind, product in kinds.items():
        ops = [operands() for _ in range(threads)]

        def work(i, product=product, ops=ops):
            torch.set_num_threads(1)
            for _ in range(times):
                product(*ops[i])

        def step(work=work):
            list(pool.map(work, range(threads)))
            torch.set_num_threads(threads)  # the workers' settings may reach MKL's global one

        name = f"gram {kind} {block} x {block} x {dim}, {threads} at once, 1 thread each"
        steps[name] = (threads * times * flop, step)
    return steps, pool


def run(rows, dim, repeats, losses):
    """Rates of every product shape first; then the losses on both paths, the fastest product
    (repeated to ~1 s, the floor step) and, with several threads, the fastest concurrent pair-tile
    product (the strict floor step) in the same interleaved rounds, so that the floors of each
    round see the load that round's losses saw."""
    z, labels = _inputs(rows, dim)
    agreement = {name: _check_agreement(name, z, labels) for name in losses}
    rates = _product_rates(rows, dim, 3)
    threads = torch.get_num_threads()
    concurrent, pool = _concurrent_steps(rows, dim, threads) if threads > 1 else ({}, None)
    try:
        concurrent_rates = {name: _rate(flop, step, 3)
                            for name, (flop, step) in concurrent.items()}
        best = max(rates, key=lambda name: rates[name][2])
        shape, step, rate = rates[best]
        times = max(1, int(rate * 1e9 // _floor.matmul_flop(*shape)))  # ~ 1 s
        steps = {f"{name} {'gram' if gram else 'full'}": _step(name, gram, z, labels)
                 for name in losses for gram in (False, True)}
        steps["floor"] = _floor.repeated(step, times)
        if concurrent:
            best_concurrent = max(concurrent_rates, key=concurrent_rates.get)
            steps["strict floor"] = concurrent[best_concurrent][1]
        samples = time_interleaved(steps, repeats)
    finally:
        if pool is not None:
            pool.shutdown()
    work = 6 * rows * rows * dim
    # Per round: the floor is `work` at the rate of that round's floor step; the strict floor at
    # that rate or the round's concurrent rate, whichever is faster.
    floor_s = [t / times * work / _floor.matmul_flop(*shape) for t in samples["floor"]]
    strict_s = floor_s
    if concurrent:
        flop = concurrent[best_concurrent][0]
        strict_s = [min(f, t * work / flop) for f, t in zip(floor_s, samples["strict floor"])]
    best_gflops = work / summarize(floor_s)["median_s"] / 1e9
    floor = {"gflops_first_pass": {name: r[2] for name, r in rates.items()}, "best": best,
             "work_flop": work, "floor": summarize(floor_s), "best_gflops": best_gflops,
             "concurrent_gflops": concurrent_rates, "strict_floor": summarize(strict_s),
             "strict_gflops": work / summarize(strict_s)["median_s"] / 1e9}
    results = {}
    for name in losses:
        full, gram = samples[f"{name} full"], samples[f"{name} gram"]
        vs_full = paired_ratio(gram, full)
        vs_floor = paired_ratio(gram, floor_s)
        vs_strict = paired_ratio(gram, strict_s)
        results[name] = {
            "full": summarize(full), "gram": summarize(gram), "gram_vs_full": vs_full,
            "full_vs_floor": paired_ratio(full, floor_s), "gram_vs_floor": vs_floor,
            "gram_vs_strict_floor": vs_strict,
            "meets_vs_full": vs_full <= TARGET_VS_FULL,
            "meets_vs_floor": max(vs_floor, vs_strict) <= TARGET_VS_FLOOR,
            "agreement": agreement[name],
        }
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": machine_info(), "load_average": os.getloadavg(), "rows": rows,
            "dim": dim, "repeats": repeats, "temperature": TEMPERATURE, "floor": floor,
            "results": results,
            "targets": {"gram_vs_full": TARGET_VS_FULL, "gram_vs_floor": TARGET_VS_FLOOR}}


def summary_markdown(record):
    m, f = record["machine"], record["floor"]
    lines = [
        f"# Symmetric-Gram targets, CPU ({record['rows']} rows, D = {record['dim']}, fp32)",
        "",
        f"Machine: {m.get('cpu')}, {m.get('torch_threads')} torch threads, torch {m.get('torch')}"
        f"; {record['date']}. One run, full and gram interleaved "
        f"({record['repeats']} rounds, order rotated), medians.",
        "",
        f"Floor: 6 rows^2 D = {f['work_flop'] / 1e9:.1f} GFLOP at the rate of the fastest "
        f"product shape ({f['best']}), timed in every round: median {f['best_gflops']:.1f} "
        f"GFLOP/s, {f['floor']['median_s']:.3f} s; ratios to it are paired per round. Load "
        f"average at the end: {', '.join(f'{x:.1f}' for x in record['load_average'])}.",
        "",
        f"Strict floor: the same work at the faster, in each round, of that rate and the "
        "fastest pair-tile product run as the kernel runs them (one thread a tile, all threads "
        f"at once), also timed in every round: median {f['strict_gflops']:.1f} GFLOP/s; ratios "
        "paired per round. The target is checked against both floors.",
        "",
        "| loss | full (s) | gram (s) | gram / full (paired) | full / floor | gram / floor | "
        "gram / strict floor | targets (<= 0.75, <= 0.8) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in record["results"].items():
        ok = ("met" if r["meets_vs_full"] else "MISSED") + " / " + (
            "met" if r["meets_vs_floor"] else "MISSED")
        lines.append(f"| {name} | {r['full']['median_s']:.3f} | {r['gram']['median_s']:.3f} | "
                     f"{r['gram_vs_full']:.3f} | {r['full_vs_floor']:.3f} | "
                     f"{r['gram_vs_floor']:.3f} | {r['gram_vs_strict_floor']:.3f} | {ok} |")
    lines += ["", "Warm GEMM rates of the kernels' product shapes, first pass (GFLOP/s):", ""]
    lines += [f"- {name}: {rate:.1f}" for name, rate in sorted(f["gflops_first_pass"].items())]
    lines += [f"- {name}: {rate:.1f}" for name, rate in sorted(f["concurrent_gflops"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", type=int, default=16384)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--losses", default="nt_xent,supcon")
    args = parser.parse_args(argv)
    record = run(args.rows, args.dim, args.repeats, args.losses.split(","))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gram_targets.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(summary_markdown(record))
    print(summary_markdown(record))


if __name__ == "__main__":
    main()
