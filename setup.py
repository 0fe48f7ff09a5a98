"""Build script: packages fastcontrast (with kernels/ installed as fastcontrast.kernels,
benchmarks/ as fastcontrast.benchmarks, the `fastcontrast bench` suite, and the C++/CUDA sources
of csrc/ as package data in fastcontrast/csrc) and, when torch is importable at build time
(`pip install --no-build-isolation`), compiles the C++ CPU extension fastcontrast._C ahead of time.

A plain `pip install .` builds in an isolated environment without torch: the wheel then carries
the sources and fastcontrast._ext compiles them just in time on first use (once, cached). A failed
extension build never fails the install either; the loaders then fall back to pure PyTorch."""
import os
import sys

from setuptools import setup

PACKAGES = ["fastcontrast", "fastcontrast.kernels", "fastcontrast.methods", "fastcontrast.cli",
            "fastcontrast.compat", "fastcontrast.infonce",
            "fastcontrast.distributed", "fastcontrast.benchmarks", "fastcontrast.csrc"]
PACKAGE_DIR = {"fastcontrast": "fastcontrast", "fastcontrast.kernels": "kernels",
               "fastcontrast.methods": "fastcontrast/methods",
               "fastcontrast.cli": "fastcontrast/cli",
               "fastcontrast.distributed": "fastcontrast/distributed",
               "fastcontrast.benchmarks": "benchmarks", "fastcontrast.csrc": "csrc"}
# The just-in-time build needs every source and header (fastcontrast/_build_flags.py finds them).
PACKAGE_DATA = {"fastcontrast.csrc": ["*.cpp", "*.h", "cpu/*.cpp", "cpu/*.h", "cuda/*.cu",
                                      "cuda/*.cuh", "cuda/*.cpp", "cuda/*.h"]}


def _extension_build():
    """Return (ext_modules, cmdclass) for the C++ extension, or ([], {}) when torch is absent or
    FASTCONTRAST_DISABLE_EXTENSION=1 (the variable that also keeps the installed package from
    loading or compiling the extension, fastcontrast/_ext.py)."""
    here = os.path.dirname(os.path.abspath(__file__))
    # The package cannot be imported before it is built: its build-time modules are, on their own.
    sys.path.insert(0, os.path.join(here, "fastcontrast"))
    from _config import from_environ  # noqa: E402

    if from_environ().disable_extension:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception:  # torch not importable in an isolated build: JIT on first use instead
        return [], {}
    from _build_flags import cpu_extension_flags, cpu_extension_sources  # noqa: E402

    sources = [os.path.relpath(p, here) for p in cpu_extension_sources(os.path.join(here, "csrc"))]
    cflags, ldflags = cpu_extension_flags()

    class OptionalBuildExtension(BuildExtension):
        """Builds the extension but only warns when the compiler fails."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # noqa: BLE001 - any compiler failure
                print(f"WARNING: fastcontrast C++ extension not built ({error}); "
                      "it will be compiled just in time on first use.", file=sys.stderr)

    ext = CppExtension("fastcontrast._C", sources, extra_compile_args=cflags,
                       extra_link_args=ldflags, include_dirs=[os.path.join(here, "csrc")])
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extension_build()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, package_data=PACKAGE_DATA,
      ext_modules=ext_modules, cmdclass=cmdclass)
