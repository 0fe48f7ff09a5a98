"""Sources and compiler flags of the C++ CPU extension, shared by setup.py (ahead of time) and
fastcontrast._ext (just in time), so both builds are identical."""
import glob
import os


def cpu_extension_sources(repo_root):
    """The .cpp files of the CPU extension: csrc/bindings.cpp and csrc/cpu/*.cpp."""
    csrc = os.path.join(repo_root, "csrc")
    kernels = sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    return [os.path.join(csrc, "bindings.cpp")] + kernels


def cpu_extension_flags():
    """(compile flags, link flags): O3, OpenMP, and the host's vector ISA (built where it runs).

    -mprefer-vector-width=512: GCC vectorises for 256-bit registers on AVX-512 hosts unless told
    otherwise; the tile passes (an exp per score) then run at half the width the GEMMs beside them
    use. Without AVX-512 the flag changes nothing."""
    cflags = ["-O3", "-fopenmp", "-fno-math-errno"]
    if os.environ.get("FASTCONTRAST_PORTABLE_BUILD") != "1":
        cflags += ["-march=native", "-mprefer-vector-width=512"]
    ldflags = ["-fopenmp"]
    return cflags, ldflags
