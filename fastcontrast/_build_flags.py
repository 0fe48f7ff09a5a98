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
    """(compile flags, link flags): O3, OpenMP, and the host's vector ISA (built where it runs)."""
    cflags = ["-O3", "-fopenmp", "-march=native", "-fno-math-errno"]
    ldflags = ["-fopenmp"]
    if os.environ.get("FASTCONTRAST_PORTABLE_BUILD") == "1":
        cflags.remove("-march=native")
    return cflags, ldflags
