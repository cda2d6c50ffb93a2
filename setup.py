"""Builds the package's CPU kernels (app/kernels/csrc) with torch's C++ extension tooling.

Everything else about the package is in pyproject.toml. The extension is optional: on a CPU that is
not x86-64, without torch at build time, or when the compiler fails, the package installs without
it and serves through the torch path (the server says which path runs). Build it with pip's
`--no-build-isolation` (the Makefile does), so it compiles against the torch that is installed.
"""

from __future__ import annotations

import os
import platform
import sys

from setuptools import setup

SOURCES = ["bindings.cpp", "isa_avx2.cpp", "isa_avx512.cpp", "isa_avx512vnni.cpp"]
# -ffp-contract=off: every fused multiply-add is written in the source; the compiler must not add
# any, or the AVX2 and AVX-512 builds (and the reduction order the kernels promise) would differ.
# No -march: the ISA of each file is set by its own `#pragma GCC target`.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-Wall", "-Wno-unused-function"]


def _kernel_build() -> dict:
    if (
        platform.machine().lower() not in ("x86_64", "amd64")
        or os.environ.get("SHARDSERVE_BUILD_KERNELS") == "0"
    ):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "shardserve: torch not importable at build time; building without the CPU kernels",
            file=sys.stderr,
        )
        return {}

    class OptionalBuild(BuildExtension):
        def run(self) -> None:
            try:
                super().run()
            except Exception as e:  # a missing or failing compiler must not fail the install
                print(
                    f"shardserve: the CPU kernels did not build ({e}); the torch path will serve",
                    file=sys.stderr,
                )
                self.extensions = []

    ext = CppExtension(
        "app.kernels._C",
        [os.path.join("app", "kernels", "csrc", s) for s in SOURCES],
        extra_compile_args={"cxx": CXX_FLAGS},
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": OptionalBuild.with_options(use_ninja=True)}}


setup(**_kernel_build())
