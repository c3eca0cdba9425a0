"""Build checks that keep the other build paths from rotting where they cannot run.

- CMakeLists.txt builds the same extension with find_package(Torch) (CPU sources).
- Every csrc/cuda/*.cu compiles with nvcc for sm_90. These kernels include only the CUDA runtime
  and CUB, so they compile on a machine without a GPU or a CUDA build of torch; the torch-facing
  glue (csrc/cuda/*.cpp) builds only with a CUDA torch, i.e. on the GPU machine.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
@pytest.mark.skipif(not (ROOT / "CMakeLists.txt").exists(), reason="no CMakeLists.txt in this checkout")
def test_cmake_builds_the_extension(tmp_path):
    import torch

    build = tmp_path / "cmake-build"
    _run(["cmake", "-S", ROOT, "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
          f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release"])
    _run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)])
    assert list(build.rglob("_C*.so")), "cmake built no _C module"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[s.name for s in CUDA_SOURCES])
def test_cuda_kernel_compiles_for_sm90(source, tmp_path):
    _run(["nvcc", "-std=c++20", "-O3", "-arch=sm_90", "-I", ROOT / "csrc", "-c", source,
          "-o", tmp_path / (source.stem + ".o")])
