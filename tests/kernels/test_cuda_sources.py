"""Compile checks of the GPU sources, which run on machines without a GPU:

- every csrc/cuda/*.cu compiles with plain `nvcc -c -arch=sm_90` (no torch headers needed);
- the launchers declared in csrc/cuda/launchers.h link against those objects (a small host
  program calls each of them), and the dtype pairs the CUDA momentum kernel accepts are the ones
  fastcontrast.momentum documents (the program prints them; no kernel runs);
- the Triton kernels of kernels/momentum.py and kernels/queue.py compile for sm_90, and the
  aligned float32 momentum kernel moves data in 128-bit vectors.
Skipped with a message where nvcc (or Triton's CUDA backend) is absent."""
import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import fastcontrast.momentum as fm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CSRC = os.path.join(REPO, "csrc")
CU_FILES = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
ARCH = "sm_90"


def _nvcc():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (set CUDA_HOME or put nvcc "
                                                     "on PATH): CUDA sources not compile-checked")


def _run(cmd, cwd):
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_there_are_cuda_sources():
    names = {os.path.basename(p) for p in CU_FILES}
    assert {"momentum.cu", "queue.cu"} <= names, names


@pytest.mark.parametrize("path", CU_FILES + glob.glob(os.path.join(CSRC, "cuda", "*.h"))
                         + glob.glob(os.path.join(CSRC, "cuda", "*.cuh")),
                         ids=os.path.basename)
def test_kernel_sources_do_not_include_torch(path):
    with open(path) as f:
        includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', f.read(), re.M)
    bad = [inc for inc in includes if inc.split("/")[0] in ("torch", "ATen", "c10", "pybind11")]
    assert not bad, f"{path} includes {bad}: keep kernels on raw pointers (launchers.h)"


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not found")
    out = tmp_path_factory.mktemp("cuda_objects")
    paths = []
    for source in CU_FILES:
        obj = out / (os.path.basename(source) + ".o")
        _run([NVCC, "-c", f"-arch={ARCH}", "-std=c++17", "-O3", "-I", CSRC, "-o", str(obj),
              source], cwd=REPO)
        paths.append(str(obj))
    return out, paths


@needs_nvcc
def test_cu_files_compile_for_sm90(objects):
    _, paths = objects
    assert len(paths) == len(CU_FILES) and all(os.path.getsize(p) > 0 for p in paths)


LINK_CHECK = textwrap.dedent("""
    // References every launcher of launchers.h with its declared signature (a link error if a
    // definition does not match its declaration) and prints the momentum kernel's supported
    // dtype pairs. No kernel runs.
    #include <cstdio>
    #include "cuda/launchers.h"
    using namespace fastcontrast::cuda;
    int main(int argc, char**) {
      const char* names[] = {"float32", "float64", "float16", "bfloat16"};
      for (int t = 0; t < 4; ++t)
        for (int o = 0; o < 4; ++o)
          if (lerp_pair_supported(static_cast<DType>(t), static_cast<DType>(o)))
            std::printf("pair %s %s\\n", names[t], names[o]);
      if (argc > 1) {  // never taken: references the launchers so that they must link
        int (*launch_lerp)(const int64_t*, int64_t, int64_t, DType, DType, double, void*) =
            &lerp_multi_tensor;
        int (*launch_enqueue)(const void*, DType, int64_t, void*, DType, int64_t, int64_t,
                              int64_t, int64_t, int64_t, const int64_t*, int64_t*,
                              const int64_t*, int64_t*, int64_t*, int64_t*, int64_t, int64_t,
                              void*) = &enqueue;
        std::printf("%p %p %s\\n", (void*)launch_lerp, (void*)launch_enqueue, error_string(0));
      }
      return 0;
    }
""")


@needs_nvcc
def test_launchers_link_and_pairs_match_the_python_contract(objects):
    out, paths = objects
    source = out / "link_check.cpp"
    source.write_text(LINK_CHECK)
    exe = out / "link_check"
    _run([NVCC, f"-arch={ARCH}", "-std=c++17", "-I", CSRC, "-o", str(exe), str(source)] + paths,
         cwd=REPO)
    printed = _run([str(exe)], cwd=REPO)
    names = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
             torch.bfloat16: "bfloat16"}
    expected = {f"pair {names[t]} {names[o]}" for t, o in fm.SUPPORTED_DTYPE_PAIRS}
    assert set(printed.split("\n")) - {""} == expected


TRITON_COMPILE = textwrap.dedent("""
    import json, re, sys
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sys.path.insert(0, REPO)
    from fastcontrast.kernels import momentum as km, queue as kq
    target = GPUTarget("cuda", 90, 32)
    result = {}
    def compile_(name, fn, signature, constexprs):
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=target,
                           options={"num_warps": 4})
        ptx = k.asm["ptx"]
        result[name] = {"v4_loads": len(re.findall(r"ld\\.global[^\\n]*\\.v4", ptx)),
                        "v4_stores": len(re.findall(r"st\\.global[^\\n]*\\.v4", ptx))}
    lerp_sig = {"Meta": "*i64", "num_tensors": "i32", "w_hi": "fp32", "w_lo": "fp32"}
    for t, o, c in (("float32", "float32", "float32"), ("float32", "bfloat16", "float32"),
                    ("float16", "float16", "float32"), ("float64", "float64", "float64")):
        compile_(f"lerp_{t}_{o}", km._lerp_multi_tensor_kernel, lerp_sig,
                 {"TGT_DTYPE": getattr(tl, t), "ONL_DTYPE": getattr(tl, o),
                  "COMPUTE_DTYPE": getattr(tl, c), "BLOCK": 4096, "ALIGNED": True,
                  "EMULATE_BF16": False})
    q_sig = {n: "*fp32" for n in ("Src", "Dst")}
    q_sig.update({n: "*i64" for n in ("SrcLabels", "DstLabels", "SrcIndices", "DstIndices",
                                      "PointerBuf", "CountBuf")})
    q_sig.update({n: "i64" for n in ("first_row", "rows", "D", "size", "pointer", "new_pointer",
                                     "new_count", "stride_src")})
    for dst in ("fp32", "bf16"):
        compile_(f"enqueue_fp32_{dst}", kq._enqueue_kernel, dict(q_sig, Dst="*" + dst),
                 {"HAS_LABELS": True, "HAS_INDICES": True, "BLOCK_R": 32, "BLOCK_D": 128,
                  "EMULATE_BF16": False})
    print(json.dumps(result))
""")


def test_triton_kernels_compile_for_sm90():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception as error:  # noqa: BLE001
        pytest.skip(f"Triton's CUDA backend is not importable here: {error}")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", f"REPO = {REPO!r}\n" + TRITON_COMPILE],
                          capture_output=True, text=True, timeout=600, env=env)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("Triton found no ptxas: kernels not compile-checked")
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result) == {"lerp_float32_float32", "lerp_float32_bfloat16", "lerp_float16_float16",
                           "lerp_float64_float64", "enqueue_fp32_fp32", "enqueue_fp32_bf16"}
    # Full, aligned fp32 tiles move in 128-bit accesses (the hints of the ALIGNED variant).
    assert result["lerp_float32_float32"]["v4_loads"] > 0
    assert result["lerp_float32_float32"]["v4_stores"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the backend may build")
def test_cuda_backend_says_why_it_is_unavailable():
    from fastcontrast import _cuda_ext

    assert not _cuda_ext.available()
    reason = _cuda_ext.unavailable_reason()
    assert reason in (f"this torch ({torch.__version__}) is a CPU-only build",
                      "no CUDA device is visible"), reason
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable: .*CUDA build of torch"):
        _cuda_ext.require()
