"""GPU check of the fused Triton InfoNCE (run by benchmarks/gpu_check.sh on a CUDA machine).

At N = M = 65536, D = 512: the Triton backend in bf16 against the torch backend in fp32 (values
and gradients), then forward+backward time (median, CUDA events via triton.testing.do_bench) and
TFLOP/s counting 8 N M D (recomputing backward), one-directional and symmetric, beside a bf16
torch.mm rate measured in the same run. Writes gpu_infonce.json into --out."""
import argparse
import json
import platform
import time

import torch
import triton.testing

import fastcontrast


def relative_error(actual, expected):
    error = (actual.float() - expected.float()).norm()
    return float(error / expected.float().norm().clamp_min(1e-30))


def loss_and_grads(q, k, backend, symmetric):
    q = q.detach().requires_grad_()
    k = k.detach().requires_grad_()
    loss = fastcontrast.info_nce(q, k, temperature=0.07, symmetric=symmetric, backend=backend)
    dq, dk = torch.autograd.grad(loss, [q, k])
    return loss.detach(), dq, dk


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True)
    parser.add_argument("--n", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    n, d = args.n, args.dim
    torch.manual_seed(0)
    q32 = torch.randn(n, d, device="cuda")
    k32 = q32 + 0.5 * torch.randn(n, d, device="cuda")  # correlated pairs, as after training
    q16, k16 = q32.bfloat16(), k32.bfloat16()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "triton": triton.__version__, "n": n, "m": n, "d": d,
              "date": time.strftime("%Y-%m-%d"), "host": platform.node(), "cases": {}}

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ a, return_mode="median")
    result["bf16_mm_tflops"] = 2 * 8192**3 / ms / 1e9
    for symmetric in (False, True):
        name = "symmetric" if symmetric else "one_directional"
        # Reference: torch backend in fp32 on the bf16-rounded inputs.
        ref = loss_and_grads(q16.float(), k16.float(), "torch", symmetric)
        got = loss_and_grads(q16, k16, "triton", symmetric)
        errors = {"loss": abs(float(got[0]) - float(ref[0])) / abs(float(ref[0])),
                  "dquery": relative_error(got[1], ref[1]), "dkey": relative_error(got[2], ref[2])}
        del ref, got
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

        def step():
            loss_and_grads(q16, k16, "triton", symmetric)

        ms = triton.testing.do_bench(step, warmup=2, rep=20, return_mode="median")
        result["cases"][name] = {
            "relative_error_vs_torch_fp32": errors,
            "passed": all(e < 2e-2 for e in errors.values()),
            "fwd_bwd_ms_median": ms, "tflops_8NMD": 8 * n * n * d / ms / 1e9,
            "peak_extra_mib": (torch.cuda.max_memory_allocated() - base) / 2**20}
        print(name, json.dumps(result["cases"][name]), flush=True)
    with open(f"{args.out}/gpu_infonce.json", "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    if not all(c["passed"] for c in result["cases"].values()):
        raise SystemExit("GPU correctness check FAILED")


if __name__ == "__main__":
    main()
