"""LIFTAdamW on the CPU with its default step, lift_kernels._C's C++ kernel, follows the trajectory of
the reference step (LIFT_BACKEND=reference) to fp32 rounding, refreshes and schedules included."""
from __future__ import annotations

import pytest
import torch

from lift_kernels import _ext
from lift_kernels.ops import native
from helpers import TRAJECTORY_STEPS, TinyMLP, backend_trajectory

STEPS = TRAJECTORY_STEPS

pytestmark = pytest.mark.skipif(native.kernel("sparse_adamw_step", "cpu") is None,
                                reason=native.why_not("sparse_adamw_step", "cpu") or "")


def _train(model, forced: str | None, dtype=torch.float32):
    return backend_trajectory(model, forced, dtype=dtype, steps=STEPS)


def test_default_cpu_step_is_the_cpp_kernel_and_follows_the_reference(monkeypatch):
    model, calls = TinyMLP(), []
    cpp = _ext.EXT.sparse_adamw_step_cpu
    with monkeypatch.context() as patch:  # registered by the backend_trajectory's use_backend(None)
        patch.setattr(_ext.EXT, "sparse_adamw_step_cpu", lambda *a: calls.append(1) or cpp(*a))
        got = _train(model, None)
    want = _train(model, "reference")
    assert len(calls) == 2 * STEPS  # one call per LIFT group and step
    for step, (g, w) in enumerate(zip(got, want), start=1):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step}: {m}")
    assert not torch.equal(got[-1][0], got[0][0]) and not torch.equal(got[-1][3], got[0][3])


@pytest.mark.parametrize("forced", [None, "native"], ids=["default", "forced_native"])
def test_bf16_weights_with_master_copies_train_like_reference(forced):
    model = TinyMLP()
    got, want = _train(model, forced, torch.bfloat16), _train(model, "reference", torch.bfloat16)
    for a, b in zip(got[-1], want[-1]):
        # the same arithmetic rounded the same way; a rare one-ulp rounding flip is allowed
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6)
