"""Build script: packages fastcontrast (with kernels/ installed as fastcontrast.kernels and
benchmarks/ as fastcontrast.benchmarks, the `fastcontrast bench` suite) and, when
torch is importable at build time, compiles the C++ CPU extension fastcontrast._C ahead of time.

A failed or impossible extension build never fails the install: fastcontrast._ext then compiles
the same sources just in time on first use, or falls back to the pure-PyTorch backend."""
import os
import sys

from setuptools import setup

PACKAGES = ["fastcontrast", "fastcontrast.kernels", "fastcontrast.methods", "fastcontrast.cli",
            "fastcontrast.benchmarks"]
PACKAGE_DIR = {"fastcontrast": "fastcontrast", "fastcontrast.kernels": "kernels",
               "fastcontrast.methods": "fastcontrast/methods",
               "fastcontrast.cli": "fastcontrast/cli", "fastcontrast.benchmarks": "benchmarks"}


def _extension_build():
    """Return (ext_modules, cmdclass) for the C++ extension, or ([], {}) when torch is absent."""
    if os.environ.get("FASTCONTRAST_NO_EXTENSION") == "1":
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception:  # torch not importable in an isolated build: JIT on first use instead
        return [], {}
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastcontrast"))
    from _build_flags import cpu_extension_flags, cpu_extension_sources  # noqa: E402

    here = os.path.dirname(os.path.abspath(__file__))
    sources = [os.path.relpath(p, here) for p in cpu_extension_sources(here)]
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
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=ext_modules, cmdclass=cmdclass)
