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
import shutil
import subprocess

# No -std flag: torch.utils.cpp_extension adds the C++ standard the installed torch's headers
# require (C++17 up to 2.12, C++20 from 2.13; >= 2.14 refuses anything older than C++20).
# -fno-math-errno lets sqrt vectorize (torch builds with it too); -ffp-contract=off keeps a*b+c
# rounded twice unless a kernel asks for a fused multiply-add (sparse_adamw_step matches torch's
# rounding operation by operation, whatever -march a user adds).
CXX_FLAGS = ["-O3", "-fno-math-errno", "-ffp-contract=off"]
NVCC_FLAGS = ["-O3", "--use_fast_math"]
LINK_FLAGS: list[str] = []
CUDA_DEFINES = {"LIFT_WITH_CUDA": "1"}  # csrc/ops.cpp binds the CUDA kernels only with it

# OpenMP: at::parallel_for in ATen's headers runs threads only where the including file is compiled
# with OpenMP; otherwise it is a plain loop and every CPU kernel runs on one core. torch's Linux wheels
# are built with GCC's OpenMP and ship that runtime (torch/lib/libgomp.so.1), so _C is compiled with
# -fopenmp and linked against that very file, never the compiler's own: one OpenMP runtime, one thread
# pool and one torch.set_num_threads for the whole process.
OPENMP_CXX_FLAGS = ["-fopenmp"]
OPENMP_RUNTIMES = ("libgomp.so.1", "libgomp.so", "libgomp.dylib")  # in torch/lib, by preference


def _compiler_version(cxx: str) -> str:
    path = shutil.which(cxx)
    if path is None:
        return ""
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def openmp(torch_lib: str, cxx: str | None = None) -> tuple[list[str], list[str], str]:
    """(compile flags, link flags, what was decided) for OpenMP in _C, built by the C++ compiler ``cxx``
    (default: $CXX, else c++, as torch.utils.cpp_extension) against the torch whose library folder is
    ``torch_lib``. GCC: -fopenmp and torch's own libgomp by path. Clang's -fopenmp emits calls into
    LLVM's runtime (libomp), a second runtime beside torch's libgomp, so clang builds without OpenMP
    (the kernels then run on one thread), as does a torch that ships no libgomp; LIFT_NO_OPENMP=1 too."""
    cxx = cxx or os.environ.get("CXX", "c++")
    if os.environ.get("LIFT_NO_OPENMP", "0") == "1":
        return [], [], "LIFT_NO_OPENMP=1: built without OpenMP; the CPU kernels run on one thread"
    version = _compiler_version(cxx)
    if "clang" in version.lower():
        return [], [], (f"{cxx} is clang, whose OpenMP runtime (libomp) is not torch's (libgomp): built without "
                        "OpenMP, so the CPU kernels run on one thread; build with GCC (CXX=g++) for threads")
    runtime = next((os.path.join(torch_lib, name) for name in OPENMP_RUNTIMES
                    if os.path.exists(os.path.join(torch_lib, name))), None)
    if runtime is None:
        return [], [], (f"torch ships no libgomp in {torch_lib}: built without OpenMP, so the CPU kernels "
                        "run on one thread")
    return list(OPENMP_CXX_FLAGS), [runtime], f"OpenMP: -fopenmp, linked against torch's {runtime}"


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
