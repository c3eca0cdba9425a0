"""LIFTAdamW with the Triton kernels (LIFT_BACKEND=triton) follows the reference trajectory."""
from __future__ import annotations

import copy

import pytest
import torch

import lift_kernels as lk
from lift_kernels import backend
from lift_kernels._triton_loader import load_kernel_module
from helpers import TinyMLP, loss_step, make_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
STEPS = 14  # refreshes at steps 3, 6, 9, 12


class _LaunchCounter:
    """Stands in for a Triton kernel and counts its launches (to prove the kernels ran)."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def _train(model, backend_name, monkeypatch, dtype=torch.float32):
    """STEPS steps of LIFTAdamW under LIFT_BACKEND=backend_name; returns the parameters after each."""
    monkeypatch.setenv("LIFT_BACKEND", backend_name)
    backend._CACHE.clear()
    model = copy.deepcopy(model).to(DEVICE, dtype)
    groups = [
        {"params": [model.up.weight], "lift": True, "lr": 2e-2},
        {"params": [model.down.weight], "lift": True, "lr": 5e-3, "weight_decay": 0.0},
        {"params": [model.up.bias, *model.norm.parameters()], "lift": False},
    ]
    # svd="exact": the selection is then the reference's under both backends, so any difference
    # comes from the step and the remap
    opt = lk.LIFTAdamW(groups, rank=2, lra_rank=3, update_interval=3, svd="exact", weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.8**s, lambda s: 1.0 + s, lambda s: 1.0])
    g = torch.Generator().manual_seed(1)
    trajectory = []
    for _ in range(STEPS):
        x, y = (t.to(DEVICE, dtype) for t in make_batch(generator=g))
        loss_step(model, opt, x, y)
        sched.step()
        trajectory.append([p.detach().clone() for p in model.parameters()])
    backend._CACHE.clear()
    return trajectory


def test_trajectory_with_refreshes_and_per_group_schedule_matches_reference(monkeypatch):
    model = TinyMLP()
    step_kernel = _LaunchCounter(load_kernel_module("sparse_adamw_step")._sparse_adamw_kernel)
    remap_kernel = _LaunchCounter(load_kernel_module("remap_state")._remap_kernel)
    with monkeypatch.context() as patch:
        patch.setattr(load_kernel_module("sparse_adamw_step"), "_sparse_adamw_kernel", step_kernel)
        patch.setattr(load_kernel_module("remap_state"), "_remap_kernel", remap_kernel)
        got = _train(model, "triton", monkeypatch)
    want = _train(model, "reference", monkeypatch)
    assert step_kernel.launches == 2 * STEPS  # one launch per LIFT group and step
    assert remap_kernel.launches == 2 * 4  # each weight at each of the four refreshes
    for step, (g, w) in enumerate(zip(got, want), start=1):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=lambda m: f"step {step}: {m}")
    # the schedule really moved the two groups differently: the run is not trivially equal
    assert not torch.equal(got[-1][0], got[0][0]) and not torch.equal(got[-1][3], got[0][3])


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_half_precision_weights_train_like_reference(monkeypatch, dtype):
    model = TinyMLP()
    got, want = _train(model, "triton", monkeypatch, dtype), _train(model, "reference", monkeypatch, dtype)
    for a, b in zip(got[-1], want[-1]):
        # the same arithmetic rounded the same way; a rare one-ulp rounding flip is allowed
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-6)
