"""lift_kernels._C is compiled with OpenMP where GCC builds it, so at::parallel_for in csrc/cpu/*.cpp
runs torch.get_num_threads() threads, on torch's own OpenMP runtime (issue 18, item 2)."""
import os

import pytest
import torch

import lift_kernels as lk
from lift_kernels import _build_config as config
from lift_kernels import _ext
from lift_kernels.optim.cpu_threads import intra_op_threads

TORCH_LIB = os.path.join(os.path.dirname(torch.__file__), "lib")
needs_ext = pytest.mark.skipif(_ext.EXT is None, reason="lift_kernels._C is not built")
gcc_build = pytest.mark.skipif(not config.openmp(TORCH_LIB)[0], reason="this compiler builds _C without OpenMP")


@needs_ext
@gcc_build
def test_built_with_openmp_and_parallel_for_uses_the_threads_torch_is_given():
    assert _ext.EXT.openmp_version() >= 201107  # OpenMP 3.1 or later
    for n in (1, 2, 3):
        with intra_op_threads(n):
            assert _ext.EXT.parallel_for_threads() == n
    with intra_op_threads(2):
        facts = lk.info()["extension"]
        assert facts["openmp_version"] == _ext.EXT.openmp_version() and facts["parallel_for_threads"] == 2


@needs_ext
@gcc_build
def test_one_openmp_runtime_in_the_process():
    with intra_op_threads(2):
        _ext.EXT.parallel_for_threads()
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libomp" in line or "libiomp" in line}
    assert runtimes == {os.path.realpath(p) for p in config.openmp(TORCH_LIB)[1]}, runtimes


def test_openmp_flags_by_compiler(monkeypatch, tmp_path):
    (tmp_path / "libgomp.so.1").write_bytes(b"")
    monkeypatch.delenv("LIFT_NO_OPENMP", raising=False)
    monkeypatch.setattr(config, "_compiler_version", lambda cxx: "g++ (Debian 12.2.0) 12.2.0")
    assert config.openmp(str(tmp_path))[:2] == (["-fopenmp"], [str(tmp_path / "libgomp.so.1")])
    monkeypatch.setattr(config, "_compiler_version", lambda cxx: "Debian clang version 14.0.6")
    cxx, link, why = config.openmp(str(tmp_path))
    assert (cxx, link) == ([], []) and "clang" in why and "one thread" in why
    monkeypatch.setattr(config, "_compiler_version", lambda cxx: "g++ (GCC) 13.1.0")
    assert config.openmp(str(tmp_path / "nowhere"))[:2] == ([], [])  # a torch without libgomp
    monkeypatch.setenv("LIFT_NO_OPENMP", "1")
    assert config.openmp(str(tmp_path))[:2] == ([], [])
