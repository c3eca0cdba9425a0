"""What lift_kernels._C is compiled from, and with which flags: defined once, for both builds.

- setup.py (the ahead-of-time build of `pip install --no-build-isolation .`) loads this file by its
  path, before it knows whether torch is importable, so it imports only the standard library;
- lift_kernels/_jit.py (the build on first use, for wheels built without torch) imports it.
Adding a flag here changes both builds, and the first-use build's cache key (a new flag rebuilds).
CMakeLists.txt (C++ work only) repeats the flags; tests/test_build.py holds it to the lists here.
"""
from __future__ import annotations

import glob
import os

# No -std flag: torch.utils.cpp_extension adds the C++ standard the installed torch's headers
# require (C++17 up to 2.12, C++20 from 2.13; >= 2.14 refuses anything older than C++20).
# -fno-math-errno lets sqrt vectorize (torch builds with it too); -ffp-contract=off keeps a*b+c
# rounded twice unless a kernel asks for a fused multiply-add (sparse_adamw_step matches torch's
# rounding operation by operation, whatever -march a user adds).
CXX_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--use_fast_math"]
LINK_FLAGS: list[str] = []
CUDA_DEFINES = {"LIFT_WITH_CUDA": "1"}  # csrc/ops.cpp binds the CUDA kernels only with it

# Relative to the csrc folder (the repository's csrc/, or lift_kernels/_csrc/ in a wheel).
CPU_SOURCES = ("*.cpp", "cpu/*.cpp")
CUDA_SOURCES = ("cuda/*.cu", "cuda/*.cpp")
# Every file a build reads (sources and the headers they include): what wheels ship and what the
# first-use build hashes into its cache key.
SOURCE_FILES = ("*.h", "*.cpp", "*.cu", "*.cuh")
SOURCE_FOLDERS = ("", "cpu", "cuda")


def sources(csrc: str, with_cuda: bool) -> list[str]:
    """The translation units of _C under the folder ``csrc``, sorted."""
    patterns = CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(csrc, pattern)))


def source_files(csrc: str) -> list[str]:
    """Every source and header under ``csrc``, relative to it, sorted."""
    return sorted(os.path.relpath(p, csrc) for folder in SOURCE_FOLDERS for pattern in SOURCE_FILES
                  for p in glob.glob(os.path.join(csrc, folder, pattern)))


def cuda_wanted(torch, cuda_home: str | None) -> bool:
    """Whether the CUDA kernels are built: torch has CUDA, a toolkit was found, LIFT_NO_CUDA is unset.
    Raises, naming the fix, where the toolkit torch found has no headers."""
    if torch.version.cuda is None or cuda_home is None or os.environ.get("LIFT_NO_CUDA", "0") == "1":
        return False
    if not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        raise RuntimeError(
            f"lift_kernels: torch has CUDA {torch.version.cuda} and nvcc was found, but CUDA_HOME={cuda_home} "
            "has no include/cuda_runtime.h (torch guessed it from nvcc's path). Set CUDA_HOME to the CUDA "
            "toolkit (e.g. CUDA_HOME=/usr/local/cuda), or LIFT_NO_CUDA=1 to build the CPU kernels only.")
    return True
