"""Backend choice, forced backends, lk.info() and the native (C++) ops."""
import contextlib

import pytest
import torch

import lift_kernels as lk
from lift_kernels import _ext, ops
from lift_kernels.ops import backends, library, native
from lift_kernels.ops.backends import BackendUnavailableError, use_backend

needs_ext = pytest.mark.skipif(_ext.EXT is None, reason=f"extension not built: {_ext.EXT_ERROR}")


def _has_cpu_kernel(op: str) -> bool:
    """Whether a backend's kernel runs for CPU tensors (else the op's reference does)."""
    return backends._REGISTRY.kernels[op, "cpu"] is not library.OPS[op]


@contextlib.contextmanager
def _without_extension(monkeypatch, forced):
    """Kernels registered for backend ``forced`` as if lift_kernels._C were not built."""
    with use_backend(forced):  # its exit registers the previous choice again, with the extension back
        with monkeypatch.context() as patch:
            patch.setattr(_ext, "EXT", None)
            patch.setattr(_ext, "EXT_ERROR", "lift_kernels._C is not built")
            use_backend(forced)
            yield


def test_info_reports_every_op_and_the_extension():
    info = lk.info()
    assert set(info["ops"]) == set(ops.OPS) == {"sparse_adamw_step", "sparse_adamw8bit_step", "remap_state",
                                                "principal_weights", "sampled_weight_grad"}
    assert info["extension"]["loaded"] == (_ext.EXT is not None)
    assert info["forced_backend"] is None
    for op, per_device in info["ops"].items():
        if not native.implements(op):  # its reference is its only kernel for now
            assert per_device["cpu"] == {"backend": "reference", "why": "default for cpu"}, op
        elif _ext.EXT is not None:  # every op of _C has a C++ kernel: the CPU default
            assert per_device["cpu"] == {"backend": "native", "why": "default for cpu"}, op
            assert f"{op}:cpu" in info["extension"]["kernels"]
        else:
            assert per_device["cpu"] == {"backend": "reference",
                                         "why": f"default for cpu (native skipped: {_ext.EXT_ERROR})"}, op


def test_default_without_the_extension_says_native_was_skipped_and_why(monkeypatch):
    with _without_extension(monkeypatch, None):
        assert ops.chosen("sparse_adamw_step", "cpu") == (
            "reference", "default for cpu (native skipped: lift_kernels._C is not built)")
        assert not _has_cpu_kernel("sparse_adamw_step")  # the reference, the op's default kernel, runs
        (out,) = lk.remap_state(torch.tensor([1, 2], dtype=torch.int32), torch.tensor([2, 3], dtype=torch.int32),
                                [torch.tensor([5.0, 6.0])])
        assert out.tolist() == [6.0, 0.0]


def test_the_dispatcher_runs_the_kernel_chosen_now(monkeypatch):
    calls = []

    def spy(*args):
        calls.append(args)
        return library.OPS["remap_state"](*args)

    monkeypatch.setitem(backends._REGISTRY.kernels, ("remap_state", "cpu"), spy)
    (out,) = lk.remap_state(torch.tensor([1], dtype=torch.int32), torch.tensor([1], dtype=torch.int32),
                            [torch.tensor([7.0])])
    assert len(calls) == 1 and out.tolist() == [7.0]
    assert torch._C._dispatch_has_kernel_for_dispatch_key("lift_kernels::remap_state", "CPU")


def test_forced_reference_backend_is_registered_and_restored():
    before = _has_cpu_kernel("remap_state")
    with use_backend("reference"):
        assert lk.info()["forced_backend"] == "reference"
        for op in ops.OPS:
            assert ops.chosen(op, "cpu") == ("reference", "forced by use_backend('reference')")
            assert not _has_cpu_kernel(op)
    assert ops.forced_backend() is None and _has_cpu_kernel("remap_state") == before


def test_lift_backend_is_read_by_use_backend(monkeypatch):
    monkeypatch.setenv("LIFT_BACKEND", " Reference ")
    with use_backend():
        assert ops.chosen("remap_state", "cpu") == ("reference", "forced by LIFT_BACKEND=reference")
    monkeypatch.delenv("LIFT_BACKEND")
    with use_backend():
        assert ops.forced_backend() is None


def test_forced_triton_keeps_the_default_for_ops_it_lacks():
    with use_backend("triton"):  # conftest runs Triton under TRITON_INTERPRET=1 without a GPU
        assert ops.chosen("sparse_adamw_step", "cpu") == ("triton", "forced by use_backend('triton')")
        backend, why = ops.chosen("principal_weights", "cpu")
        assert why.startswith("use_backend('triton') has no principal_weights; default for cpu")
        assert backend == ("native" if _ext.EXT is not None else "reference")


@pytest.mark.parametrize("name, match", [("metal", "LIFT_BACKEND must be one of .* got 'metal'$"),
                                         ("cuda", "'cuda' is now 'native'")])
def test_unknown_backend_name_is_refused(name, match):
    with pytest.raises(ValueError, match=match):
        use_backend(name)
    assert ops.forced_backend() is None


def test_forced_native_backend_without_extension_raises_naming_op_device_reason_and_fix(monkeypatch):
    idx = torch.tensor([1, 2], dtype=torch.int32)
    with _without_extension(monkeypatch, "native"):
        backend, why = ops.chosen("remap_state", "cpu")
        assert backend == "error"
        with pytest.raises(BackendUnavailableError) as err:
            lk.remap_state(idx, idx, [torch.zeros(2)])
    assert str(err.value) == why == (
        "use_backend('native') was forced but cannot run remap_state on cpu tensors: lift_kernels._C is not "
        "built. Call lift_kernels.ops.use_backend(None) (or leave the use_backend block) to let lift_kernels "
        "choose, or install what is missing.")


def test_forcing_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    idx = torch.tensor([1, 2], dtype=torch.int32)
    with use_backend("triton"):
        with pytest.raises(BackendUnavailableError, match=r"use_backend\('triton'\) was forced but cannot run "
                           "remap_state on cpu tensors: Triton runs CPU tensors only under TRITON_INTERPRET=1"):
            lk.remap_state(idx, idx, [torch.zeros(2)])


@needs_ext
def test_native_remap_matches_reference_and_passes_opcheck():
    from lift_kernels.reference import remap_state as reference

    cpp = native.kernel("remap_state", "cpu")
    for k_old, k_new in [(0, 4), (7, 0), (1, 1), (4097, 123)]:
        old = torch.randperm(9001)[:k_old].sort().values.to(torch.int32)
        new = torch.randperm(9001)[:k_new].sort().values.to(torch.int32)
        states = [torch.randn(k_old), torch.randn(k_old, dtype=torch.float64),
                  torch.randn(k_old).bfloat16()]
        for got, want in zip(cpp(old, new, states), reference(old, new, states)):
            assert got.dtype == want.dtype and torch.equal(got, want)
        with use_backend("native"):
            torch.library.opcheck(torch.ops.lift_kernels.remap_state.default, (old, new, states))


@needs_ext
def test_native_remap_rejects_bad_input():
    with use_backend("native"):
        with pytest.raises(RuntimeError, match="int32"):
            lk.remap_state(torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int32), [torch.zeros(2)])
        with pytest.raises(RuntimeError, match="as many entries as old_idx"):
            lk.remap_state(torch.zeros(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), [torch.zeros(3)])


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


@needs_ext
def test_choices_for_cuda_tensors_name_what_runs_and_what_was_skipped():
    """choose() for CUDA tensors, on any machine (this build's _C has CPU kernels; a CUDA build has both)."""
    from lift_kernels.ops.backends import choose

    from lift_kernels._triton_loader import triton_usable

    triton_ok, triton_why = triton_usable()
    assert choose("sparse_adamw_step", "cuda", None) == (
        ("triton", "default for cuda") if triton_ok else ("reference", f"default for cuda (triton skipped: {triton_why}; "
                                                          "native skipped: lift_kernels._C has no cuda kernel for "
                                                          "sparse_adamw_step (it has one for cpu tensors only))"))
    has_cuda = native.kernel("principal_weights", "cuda") is not None
    assert choose("principal_weights", "cuda", None) == (
        ("native", "default for cuda") if has_cuda else
        ("reference", "default for cuda (native skipped: lift_kernels._C has no cuda kernel for principal_weights "
                      "(it has one for cpu tensors only))"))
    # forcing native never moves the step quietly to Triton: _C has no CUDA step
    with pytest.raises(BackendUnavailableError, match=r"LIFT_BACKEND=native was forced but cannot run "
                       r"sparse_adamw_step on cuda tensors: lift_kernels._C has no cuda kernel for sparse_adamw_step "
                       r"\(it has one for cpu tensors only\)"):
        choose("sparse_adamw_step", "cuda", "native")
