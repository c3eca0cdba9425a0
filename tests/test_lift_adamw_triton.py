"""LIFTAdamW with the Triton kernels (LIFT_BACKEND=triton) follows the reference trajectory."""
from __future__ import annotations

import pytest
import torch

from lift_kernels._triton_loader import load_kernel_module
from helpers import TRAJECTORY_STEPS, TinyMLP, backend_trajectory

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = TRAJECTORY_STEPS


class _LaunchCounter:
    """Stands in for a Triton kernel and counts its launches (to prove the kernels ran)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _train(model, backend_name, dtype=torch.float32):
    return backend_trajectory(model, backend_name, DEVICE, dtype, steps=STEPS)


def test_trajectory_with_refreshes_and_per_group_schedule_matches_reference(monkeypatch):
    model = TinyMLP()
    step_kernel = _LaunchCounter(load_kernel_module("sparse_adamw_step")._sparse_adamw_kernel)
    remap_kernel = _LaunchCounter(load_kernel_module("remap_state")._remap_kernel)
    with monkeypatch.context() as patch:
        patch.setattr(load_kernel_module("sparse_adamw_step"), "_sparse_adamw_kernel", step_kernel)
        patch.setattr(load_kernel_module("remap_state"), "_remap_kernel", remap_kernel)
        got = _train(model, "triton")
    want = _train(model, "reference")
    assert step_kernel.launches == 2 * STEPS  # one launch per LIFT group and step
    assert remap_kernel.launches == 2 * 4  # each weight at each of the four refreshes
    for step, (g, w) in enumerate(zip(got, want), start=1):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step}: {m}")
    # the schedule really moved the two groups differently: the run is not trivially equal
    assert not torch.equal(got[-1][0], got[0][0]) and not torch.equal(got[-1][3], got[0][3])


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_half_precision_weights_train_like_reference(dtype):
    model = TinyMLP()
    got, want = _train(model, "triton", dtype), _train(model, "reference", dtype)
    for a, b in zip(got[-1], want[-1]):
        # the same arithmetic rounded the same way; a rare one-ulp rounding flip is allowed
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6)
