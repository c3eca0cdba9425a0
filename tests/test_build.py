"""Build checks that keep the other build paths from rotting where they cannot run.

- CMakeLists.txt builds the same extension with find_package(Torch), with the flags of
  lift_kernels/_build_config.py (which setup.py and the first-use build share): the C++ standard
  torch's cpp_extension picks, and for CUDA exactly the arch list it documents (LIFT_CUDA_ARCHITECTURES).
- Every csrc/cuda/*.cu compiles with nvcc for sm_90. These kernels include only the CUDA runtime
  and CUB, so they compile on a machine without a GPU or a CUDA build of torch; the torch-facing
  glue (csrc/cuda/*.cpp) builds with a CUDA torch (CI builds it against torch 2.14.1+cu130).
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lift_kernels import _build_config as config

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
TORCH_VERSION = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
# The C++ standard torch.utils.cpp_extension (setup.py, the first-use build) compiles with; CMakeLists.txt must agree.
CXX_STD = "-std=c++20" if TORCH_VERSION >= (2, 13) else "-std=c++17"
needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")


def _run(cmd, **kw):
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kw)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def _cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return home if (Path(home) / "bin" / "nvcc").exists() else None


def _nvrtc_from_wheel() -> list[str]:
    """torch's CMake links nvrtc; a toolkit without it (CI's has only the compiler and cudart) can
    use the copy that torch's CUDA wheels install."""
    if list(Path(_cuda_home()).glob("lib64/libnvrtc.so*")):
        return []
    import nvidia  # the nvidia-* wheels a CUDA build of torch depends on

    found = sorted(p for root in nvidia.__path__ for p in Path(root).glob("*/lib/libnvrtc.so*")
                   if "builtins" not in p.name and ".alt." not in p.name)
    return [f"-DCUDA_nvrtc_LIBRARY={found[0]}"] if found else []


def _configure(build: Path, *extra: str) -> list[dict]:
    if torch.version.cuda is not None and _cuda_home() is not None:
        # find_package(Torch) of a CUDA torch looks for the toolkit even for a CPU-only build.
        extra = (f"-DCUDA_TOOLKIT_ROOT_DIR={_cuda_home()}", *_nvrtc_from_wheel(), *extra)
    _run(["cmake", "-S", ROOT, "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
          f"-DPython_EXECUTABLE={sys.executable}", "-DCMAKE_BUILD_TYPE=Release",
          "-DCMAKE_EXPORT_COMPILE_COMMANDS=ON", *extra])
    return json.loads((build / "compile_commands.json").read_text())


@needs_cmake
def test_cmake_builds_the_extension_with_setup_flags(tmp_path):
    build = tmp_path / "cmake-build"
    commands = _configure(build)
    cpp = [c for c in commands if c["file"].endswith(".cpp")]
    assert len(cpp) == len(list((ROOT / "csrc").glob("*.cpp"))) + len(list((ROOT / "csrc" / "cpu").glob("*.cpp")))
    for c in cpp:
        assert CXX_STD in c["command"].split(), f"{c['file']} is not compiled with {CXX_STD}: {c['command']}"
        for flag in config.CXX_FLAGS:  # what setup.py and the first-use build compile with
            assert flag in c["command"].split(), f"{c['file']} lacks _build_config.py's {flag}: {c['command']}"
    _run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2)])
    assert list(build.rglob("_C*.so")), "cmake built no _C module"


@needs_cmake
def test_cmake_compiles_with_openmp_as_setup_does(tmp_path):
    """CMakeLists.txt mirrors _build_config.openmp(): -fopenmp and torch's libgomp with GCC, neither
    with clang (it says so)."""
    build = tmp_path / "cmake-build"
    commands = _configure(build)
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    cxx_flags, link_flags, _ = config.openmp(torch_lib)
    for c in (c for c in commands if c["file"].endswith(".cpp")):
        assert ("-fopenmp" in c["command"].split()) == bool(cxx_flags), c["command"]
    link = next(build.rglob("link.txt")).read_text()
    for lib in link_flags:  # torch's libgomp, by path
        assert lib in link, link
    assert ("libgomp" in link or "-fopenmp" in link) == bool(cxx_flags), link


@needs_cmake
@pytest.mark.skipif(torch.version.cuda is None, reason="the CUDA glue needs a CUDA build of torch")
@pytest.mark.skipif(_cuda_home() is None, reason="no CUDA toolkit (set CUDA_HOME)")
def test_cmake_cuda_build_honours_the_arch_list(tmp_path):
    build = tmp_path / "cmake-cuda"
    env_arch = os.environ.pop("TORCH_CUDA_ARCH_LIST", None)  # the option must win over the environment
    try:
        commands = _configure(build, "-DLIFT_WITH_CUDA=ON", "-DLIFT_CUDA_ARCHITECTURES=9.0",
                              f"-DCMAKE_CUDA_COMPILER={_cuda_home()}/bin/nvcc")
    finally:
        if env_arch is not None:
            os.environ["TORCH_CUDA_ARCH_LIST"] = env_arch
    cu = [c for c in commands if c["file"].endswith(".cu")]
    assert len(cu) == len(CUDA_SOURCES)
    for c in cu:
        cmd = c["command"]
        assert "arch=compute_90" in cmd and "compute_50" not in cmd, cmd
        # _build_config.py's nvcc flags, and those torch.utils.cpp_extension adds to every CUDA extension
        for flag in (*config.NVCC_FLAGS, CXX_STD, "-D__CUDA_NO_HALF_OPERATORS__", "--expt-relaxed-constexpr"):
            assert flag in cmd.split(), f"{c['file']} lacks setup.py's {flag}: {cmd}"
    _run(["cmake", "--build", build, "--target", "_C", "-j", str(os.cpu_count() or 2)])
    assert list(build.rglob("_C*.so"))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=[s.name for s in CUDA_SOURCES])
def test_cuda_kernel_compiles_for_sm90(source, tmp_path):
    _run(["nvcc", CXX_STD, *config.NVCC_FLAGS, "-arch=sm_90", "-I", ROOT / "csrc", "-c", source,
          "-o", tmp_path / (source.stem + ".o")])
