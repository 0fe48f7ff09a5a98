"""GPU check of the fused Triton SigLIP loss (kernels/siglip.py), under 90 s on an H200.

    python3 benchmarks/gpu_siglip_check.py OUT_DIR [--n 65536] [--dim 768]

1. Correctness at scale: the Triton backend in bf16 and fp32 against the torch backend in fp32
   on the same (bf16-rounded) inputs at N = --n (values and all four gradients), and against
   the float64 reference at N = 4096.
2. Speed: forward+backward median time (CUDA events) of the Triton loss in bf16 and fp32 and of
   OpenCLIP's materialised formula in bf16, peak extra GPU memory, and TFLOP/s counting the
   essential 6 N^2 D and the 10 N^2 D the kernels run (forward, then two recomputing backward
   launches), beside a bf16 torch.mm rate measured in the same run.
Writes gpu_siglip.json into OUT_DIR; exits non-zero when a correctness check fails.
--device cpu runs the same steps at a tiny size (Triton's interpreter): a smoke test only.
"""
import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time

import torch



def _import_fastcontrast():
    """fastcontrast with its kernels subpackage: installed, on PYTHONPATH, or this checkout (with
    kernels/ mapped to fastcontrast.kernels, as setup.py maps it)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        import fastcontrast.kernels  # noqa: F401
    except ImportError:
        sys.path.insert(0, root)
        import fastcontrast
        spec = importlib.util.spec_from_file_location(
            "fastcontrast.kernels", os.path.join(root, "kernels", "__init__.py"),
            submodule_search_locations=[os.path.join(root, "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["fastcontrast.kernels"] = module
        spec.loader.exec_module(module)
        fastcontrast.kernels = module


_import_fastcontrast()
from fastcontrast import siglip_loss  # noqa: E402
from fastcontrast.reference import siglip_loss_reference  # noqa: E402

SCALE, BIAS = 10.0, -10.0
TOLERANCE = {torch.bfloat16: 2e-2, torch.float32: 1e-4}  # relative L2 error vs torch fp32


def make_inputs(n, d, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
    noise = torch.nn.functional.normalize(torch.randn(n, d, device=device, generator=gen), dim=1)
    return image, torch.nn.functional.normalize(image + noise, dim=1)


def loss_and_grads(fn, image, text, dtype):
    leaves = [image.detach().to(dtype).requires_grad_(), text.detach().to(dtype).requires_grad_(),
              torch.tensor(SCALE, device=image.device, requires_grad=True),
              torch.tensor(BIAS, device=image.device, requires_grad=True)]
    loss = fn(*leaves)
    return [loss.detach()] + list(torch.autograd.grad(loss, leaves))


def relative_errors(got, expected):
    names = ("loss", "dimage", "dtext", "dscale", "dbias")
    return {name: float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
            for name, a, b in zip(names, got, expected)}


def materialised(image, text, scale, bias):
    logits = scale * image @ text.T + bias
    labels = 2 * torch.eye(image.shape[0], dtype=logits.dtype, device=logits.device) - 1
    return -torch.nn.functional.logsigmoid(labels * logits).sum() / image.shape[0]


def median_ms(step, device, reps):
    """Median milliseconds of step() over reps (CUDA events on a GPU), after one warm-up."""
    step()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def peak_extra_mib(step, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    device, n, d = args.device, args.n, args.dim
    if device == "cpu":
        n, d = min(n, 96), min(d, 40)
    reps = 10 if device == "cuda" else 1
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(0)
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
              "torch": torch.__version__, "n": n, "d": d, "scale": SCALE, "bias": BIAS,
              "date": time.strftime("%Y-%m-%d %H:%M"), "checks": {}, "timings": {}}
    triton_loss = lambda *a: siglip_loss(*a, backend="triton")  # noqa: E731
    torch_loss = lambda *a: siglip_loss(*a, backend="torch")  # noqa: E731

    # 1. Correctness.
    image, text = make_inputs(n, d, device)
    image, text = image.bfloat16().float(), text.bfloat16().float()  # representable in bf16
    expected = loss_and_grads(torch_loss, image, text, torch.float32)
    for dtype in (torch.bfloat16, torch.float32):
        errors = relative_errors(loss_and_grads(triton_loss, image, text, dtype), expected)
        result["checks"][f"triton_{str(dtype)[6:]}_vs_torch_fp32_n{n}"] = {
            "relative_l2_error": errors, "passed": max(errors.values()) < TOLERANCE[dtype]}
    del expected
    small = min(n, 4096)
    expected = loss_and_grads(siglip_loss_reference, image[:small], text[:small], torch.float64)
    errors = relative_errors(loss_and_grads(triton_loss, image[:small], text[:small],
                                            torch.float32), expected)
    result["checks"][f"triton_float32_vs_reference_fp64_n{small}"] = {
        "relative_l2_error": errors, "passed": max(errors.values()) < TOLERANCE[torch.float32]}
    del expected
    for name, check in result["checks"].items():
        print(name, json.dumps(check), flush=True)

    # 2. Speed and memory.
    if device == "cuda":
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        result["bf16_mm_tflops"] = 2 * 8192**3 / median_ms(lambda: a @ a, device, reps) / 1e9
        del a
    cases = {"triton_bf16": (triton_loss, torch.bfloat16, reps),
             "triton_fp32": (triton_loss, torch.float32, max(1, reps // 3)),  # FMA-bound, slow
             "materialised_bf16": (materialised, torch.bfloat16, reps)}
    for name, (fn, dtype, case_reps) in cases.items():
        def step(fn=fn, dtype=dtype):
            loss_and_grads(fn, image, text, dtype)
        try:
            ms = median_ms(step, device, case_reps)
            timing = {"fwd_bwd_ms_median": ms, "peak_extra_mib": peak_extra_mib(step, device),
                      "tflops_essential_6N2D": 6 * n * n * d / ms / 1e9,
                      "tflops_executed_10N2D": 10 * n * n * d / ms / 1e9}
        except torch.OutOfMemoryError as error:  # the materialised logits at large N
            timing = {"error": f"out of memory: {str(error).splitlines()[0]}"}
        result["timings"][name] = timing
        print(name, json.dumps(timing), flush=True)

    with open(os.path.join(args.out, "gpu_siglip.json"), "w") as f:
        json.dump(result, f, indent=2)
    if not all(check["passed"] for check in result["checks"].values()):
        raise SystemExit("GPU SigLIP correctness check FAILED")


if __name__ == "__main__":
    main()
