"""Sources and compiler flags of the C++ extensions, shared by setup.py (ahead of time) and the
just-in-time loaders (fastcontrast._ext, fastcontrast._cuda_ext), so that every build compiles
the same files with the same flags.

Where the sources are (``csrc_directory``):
    installed from a wheel or sdist   <site-packages>/fastcontrast/csrc   (setup.py ships csrc/
                                      there as package data)
    a source checkout / editable      <repository>/csrc
"""
import glob
import os

try:
    from ._config import settings
except ImportError:  # imported by setup.py as a module of its own, before the package exists
    from _config import settings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_MARKER = "bindings.cpp"  # every complete csrc/ tree has it


def csrc_directory():
    """The directory holding bindings.cpp, cpu/ and cuda/, or None when this installation ships
    no C++ sources."""
    for candidate in (os.path.join(_PACKAGE_DIR, "csrc"),
                      os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc")):
        if os.path.isfile(os.path.join(candidate, _MARKER)):
            return candidate
    return None


def cpu_extension_sources(csrc):
    """The .cpp files of the CPU extension: csrc/bindings.cpp and csrc/cpu/*.cpp."""
    kernels = sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    return [os.path.join(csrc, "bindings.cpp")] + kernels


def cpu_extension_headers(csrc):
    """The headers the CPU sources include (a change to one of them invalidates a build)."""
    return sorted(glob.glob(os.path.join(csrc, "*.h"))
                  + glob.glob(os.path.join(csrc, "cpu", "*.h")))


def cuda_extension_sources(csrc):
    """The sources of the CUDA extension: csrc/cuda/*.cu and csrc/cuda/cuda_bindings.cpp."""
    return sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu"))) + [
        os.path.join(csrc, "cuda", "cuda_bindings.cpp")]


def cuda_extension_headers(csrc):
    """The headers the CUDA sources include (csrc/cuda/*.h, *.cuh)."""
    return sorted(glob.glob(os.path.join(csrc, "cuda", "*.h"))
                  + glob.glob(os.path.join(csrc, "cuda", "*.cuh")))


def cpu_extension_flags():
    """(compile flags, link flags): O3, OpenMP, and the host's vector ISA (built where it runs).

    -mprefer-vector-width=512: GCC vectorises for 256-bit registers on AVX-512 hosts unless told
    otherwise; the tile passes (an exp per score) then run at half the width the GEMMs beside them
    use. Without AVX-512 the flag changes nothing."""
    cflags = ["-O3", "-fopenmp", "-fno-math-errno"]
    if not settings().portable_build:
        cflags += ["-march=native", "-mprefer-vector-width=512"]
    ldflags = ["-fopenmp"]
    return cflags, ldflags
