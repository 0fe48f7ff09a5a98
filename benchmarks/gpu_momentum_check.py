"""One prepared GPU check of the MoCo machinery (momentum_update, NegativeQueue), for a lent GPU:

    python benchmarks/gpu_momentum_check.py OUT_DIR

1. correctness on CUDA tensors of every backend ("torch", "triton", "cuda") against a float64
   reference: momentum_update over odd shapes and every supported dtype pair, and ring-buffer
   enqueues (wrap-around, batch larger than the queue, fp32 -> bf16 cast, labels and indices);
2. bandwidth of momentum_update over ResNet-50's parameter list (fp32, 25.6M elements) and of
   torch._foreach_lerp_, against the measured copy bandwidth (a 1 GiB device-to-device copy_),
   CUDA-event timing, medians; target: at least 80% of the copy bandwidth.
Writes gpu_momentum_check.json and a log; budget about 90 s (the first "cuda" call compiles the
extension just in time: set MAX_JOBS to the core count).
"""
import json
import os
import platform
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _momentum_cases import make_params, resnet50_param_shapes  # noqa: E402  (this folder)

import fastcontrast.momentum as fm  # noqa: E402
from fastcontrast import _cuda_ext  # noqa: E402
from fastcontrast.queue import NegativeQueue  # noqa: E402

BACKENDS = ("torch", "triton", "cuda")
SHAPES = [(1,), (3,), (257,), (1000, 3), (5, 7, 3), (0, 4), (70001,), (4096,), (4097,)]


def cuda_time(fn, repeats=50, warmup=5):
    """Median milliseconds of fn() by CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def check_momentum(backend):
    worst = 0.0
    for target_dtype, online_dtype in sorted(fm.SUPPORTED_DTYPE_PAIRS, key=str):
        targets, onlines = make_params(SHAPES, target_dtype, "cuda", online_dtype)
        for m in (0.999, 0.3, 1.0, 0.0):
            before = [t.double() for t in targets]
            fm.momentum_update(targets, onlines, m, backend=backend)
            for t, b, o in zip(targets, before, onlines):
                expected = m * b + (1 - m) * o.double()
                ulp = torch.finfo(target_dtype).eps
                err = (t.double() - expected).abs() / (expected.abs() + (b.abs() + o.double().abs())
                                                       * 1e-6 + 1e-30)
                if t.numel():
                    worst = max(worst, float(err.max()) / ulp)
            if m == 0.0:
                assert all(torch.equal(t, o.to(target_dtype)) for t, o in zip(targets, onlines))
    assert worst <= 1.0, f"momentum {backend}: max error {worst:.2f} ulp of the target dtype"
    return worst


def check_queue(backend):
    for queue_dtype in (torch.float32, torch.bfloat16):
        queue = NegativeQueue(7, 5, dtype=queue_dtype, device="cuda", store_labels=True,
                              store_indices=True, backend=backend)
        ref = torch.zeros(7, 5, dtype=torch.float64)
        ref_labels = torch.full((7,), -1)
        pointer, seen = 0, 0
        for batch in (3, 5, 1, 20, 7, 2):
            keys = torch.randn(batch, 5, device="cuda")
            labels = torch.randint(0, 9, (batch,), device="cuda")
            queue.enqueue(keys, labels, torch.arange(seen, seen + batch, device="cuda"))
            for b in range(batch):
                ref[pointer] = keys[b].double().cpu()
                ref_labels[pointer] = int(labels[b])
                pointer = (pointer + 1) % 7
            seen += batch
            assert int(queue.pointer) == pointer and len(queue) == min(seen, 7)
            assert torch.equal(queue.keys.cpu(), ref.to(queue_dtype)), (backend, queue_dtype)
            assert torch.equal(queue.labels.cpu(), ref_labels)
    return True


def bandwidth(log):
    src = torch.empty(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = cuda_time(lambda: dst.copy_(src), repeats=20)
    copy_gbps = 2 * src.numel() * 4 / copy_ms / 1e6
    src = dst = None  # free the 2 GiB before the next measurement
    targets, onlines = make_params(resnet50_param_shapes(), torch.float32, "cuda")
    moved = 12 * sum(t.numel() for t in targets)
    steps = {"torch._foreach_lerp_": lambda: torch._foreach_lerp_(targets, onlines, 0.001)}
    for backend in BACKENDS:
        steps[f"fastcontrast[{backend}]"] = (
            lambda b=backend: fm.momentum_update(targets, onlines, 0.999, backend=b))
    results = {"copy_gbps": copy_gbps}
    for name, step in steps.items():
        try:
            ms = cuda_time(step)
        except Exception as error:  # noqa: BLE001 - report, keep measuring the others
            results[name] = {"error": f"{type(error).__name__}: {error}"}
            continue
        gbps = moved / ms / 1e6
        results[name] = {"median_ms": ms, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps}
        log(f"{name:28s} {ms:8.3f} ms  {gbps:7.0f} GB/s  {gbps / copy_gbps:.0%} of copy")
    return results


def main(out):
    os.makedirs(out, exist_ok=True)
    lines = []

    def log(text):
        print(text, flush=True)
        lines.append(text)

    t0 = time.perf_counter()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                          time.gmtime()),
              "checks": {}}
    log(f"{result['gpu']}, torch {torch.__version__}")
    if not _cuda_ext.available():
        log(f"cuda backend unavailable: {_cuda_ext.unavailable_reason()}")
    log(f"cuda extension ready after {time.perf_counter() - t0:.1f} s")
    for backend in BACKENDS:
        for name, check in (("momentum", check_momentum), ("queue", check_queue)):
            key = f"{name}[{backend}]"
            try:
                value = check(backend)
                result["checks"][key] = {"ok": True, "value": value}
                log(f"{key}: ok ({value})")
            except Exception as error:  # noqa: BLE001 - report every failure, then go on
                result["checks"][key] = {"ok": False, "error": traceback.format_exc()[-2000:]}
                log(f"{key}: FAILED {type(error).__name__}: {error}")
    result["bandwidth"] = bandwidth(log)
    best = max((v["fraction_of_copy"] for k, v in result["bandwidth"].items()
                if k.startswith("fastcontrast[triton") and isinstance(v, dict) and "gbps" in v),
               default=None)
    result["target_80pct_of_copy_met_by_triton"] = None if best is None else best >= 0.8
    result["seconds"] = time.perf_counter() - t0
    log(f"done in {result['seconds']:.1f} s")
    with open(os.path.join(out, "gpu_momentum_check.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out, "gpu_momentum_check.log"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0 if all(c["ok"] for c in result["checks"].values()) else 1


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    if not torch.cuda.is_available():
        sys.exit("gpu_momentum_check.py needs a CUDA device")
    sys.exit(main(sys.argv[1]))
