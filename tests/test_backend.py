"""Backend choice, forced backends, lk.info() and the native (C++) ops."""
import pytest
import torch

import lift_kernels as lk
from lift_kernels import _ext, backend


@pytest.fixture
def clean_cache():
    backend._CACHE.clear()
    yield
    backend._CACHE.clear()


def test_info_reports_every_op_and_the_extension():
    info = lk.info()
    assert set(info["ops"]) == set(backend.OPS)
    for op, per_device in info["ops"].items():
        assert per_device["cpu"]["backend"] in backend.BACKENDS, (op, per_device)
        assert per_device["cpu"]["why"]
    assert info["extension"]["loaded"] == (_ext.EXT is not None)


def test_unknown_backend_name_is_refused(monkeypatch, clean_cache):
    monkeypatch.setenv("LIFT_BACKEND", "metal")
    with pytest.raises(ValueError, match="LIFT_BACKEND must be one of"):
        lk.remap_state(torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), [])


def test_forced_cuda_backend_without_extension_raises(monkeypatch, clean_cache):
    monkeypatch.setenv("LIFT_BACKEND", "cuda")
    monkeypatch.setattr(_ext, "EXT", None)
    monkeypatch.setattr(_ext, "EXT_ERROR", "lift_kernels._C is not built")
    idx = torch.tensor([1, 2], dtype=torch.int32)
    with pytest.raises(backend.BackendUnavailableError, match="LIFT_BACKEND=cuda was forced.*not built"):
        lk.remap_state(idx, idx, [torch.zeros(2)])


def test_forced_reference_backend_is_used(monkeypatch, clean_cache):
    monkeypatch.setenv("LIFT_BACKEND", "reference")
    assert backend.choose("remap_state", "cpu") == ("reference", "forced by LIFT_BACKEND=reference")


needs_ext = pytest.mark.skipif(_ext.EXT is None, reason=f"extension not built: {_ext.EXT_ERROR}")


@needs_ext
def test_native_remap_matches_reference_and_passes_opcheck():
    from lift_kernels.native_ops import remap_state as native
    from lift_kernels.reference import remap_state as reference

    for k_old, k_new in [(0, 4), (7, 0), (1, 1), (4097, 123)]:
        old = torch.randperm(9001)[:k_old].sort().values.to(torch.int32)
        new = torch.randperm(9001)[:k_new].sort().values.to(torch.int32)
        states = [torch.randn(k_old), torch.randn(k_old, dtype=torch.float64),
                  torch.randn(k_old).bfloat16()]
        for got, want in zip(native(old, new, states), reference(old, new, states)):
            assert got.dtype == want.dtype and torch.equal(got, want)
        torch.library.opcheck(torch.ops.lift_kernels.remap_state.default, (old, new, states))


@needs_ext
def test_native_remap_rejects_bad_input():
    with pytest.raises(RuntimeError, match="int32"):
        torch.ops.lift_kernels.remap_state(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32),
                                           [torch.zeros(2)])
    with pytest.raises(RuntimeError, match="as many entries as old_idx"):
        torch.ops.lift_kernels.remap_state(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32),
                                           [torch.zeros(3)])


def test_triton_folder_does_not_shadow_real_triton():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", "import triton, sys; print(triton.__file__)"], cwd=root,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"triton not installed: {out.stderr.strip()[-200:]}")
    assert not out.stdout.strip().startswith(str(root / "triton")), out.stdout
