"""LIFTAdamW on the CPU with its default step, lift_kernels._C's C++ kernel, follows the trajectory of
the reference step (LIFT_BACKEND=reference) to fp32 rounding, refreshes and schedules included."""
from __future__ import annotations

import pytest
import torch

from lift_kernels import _ext, native_ops
from helpers import TRAJECTORY_STEPS, TinyMLP, backend_trajectory

STEPS = TRAJECTORY_STEPS

pytestmark = pytest.mark.skipif(not _ext.has_native_op("sparse_adamw_step", "cpu"),
                                reason=f"lift_kernels._C has no CPU sparse_adamw_step ({_ext.EXT_ERROR})")


def _train(model, monkeypatch, forced: str | None, dtype=torch.float32):
    return backend_trajectory(model, monkeypatch, forced, dtype=dtype, steps=STEPS)


def test_default_cpu_step_is_the_cpp_kernel_and_follows_the_reference(monkeypatch):
    model, calls = TinyMLP(), []
    with monkeypatch.context() as patch:
        patch.setattr(native_ops, "sparse_adamw_step",
                      lambda *a, **kw: calls.append(1) or torch.ops.lift_kernels.sparse_adamw_step(
                          *a[:5], a[5] or [], kw["step"], kw["lr"], kw["beta1"], kw["beta2"], kw["eps"],
                          kw["weight_decay"]))
        got = _train(model, monkeypatch, None)
    want = _train(model, monkeypatch, "reference")
    assert len(calls) == 2 * STEPS  # one call per LIFT group and step
    for step, (g, w) in enumerate(zip(got, want), start=1):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step}: {m}")
    assert not torch.equal(got[-1][0], got[0][0]) and not torch.equal(got[-1][3], got[0][3])


def test_bf16_weights_with_master_copies_train_like_reference(monkeypatch):
    model = TinyMLP()
    got, want = _train(model, monkeypatch, None, torch.bfloat16), _train(model, monkeypatch, "reference", torch.bfloat16)
    for a, b in zip(got[-1], want[-1]):
        # the same arithmetic rounded the same way; a rare one-ulp rounding flip is allowed
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6)
