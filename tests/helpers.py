"""Small models and oracles shared by the optimizer tests."""
from __future__ import annotations

import torch
from torch import nn


class TinyMLP(nn.Module):
    """Two linears with odd shapes, a bias and a norm: enough to exercise LIFT and dense groups."""

    def __init__(self, d_in: int = 23, hidden: int = 37, d_out: int = 11):
        super().__init__()
        self.up = nn.Linear(d_in, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.down = nn.Linear(hidden, d_out, bias=False)

    def forward(self, x):
        return self.down(torch.tanh(self.norm(self.up(x))))


def make_batch(n: int = 16, d_in: int = 23, d_out: int = 11, generator=None):
    x = torch.randn(n, d_in, generator=generator)
    y = torch.randn(n, d_out, generator=generator)
    return x, y


def loss_step(model, opt, x, y):
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def selected_mask(p, opt) -> torch.Tensor:
    mask = torch.zeros(p.numel(), dtype=torch.bool)
    mask[opt.state[p]["idx"].long()] = True
    return mask.view_as(p)


TRAJECTORY_STEPS = 14  # refreshes at steps 3, 6, 9, 12


def backend_trajectory(model, forced: str | None, device="cpu", dtype=torch.float32,
                       steps: int = TRAJECTORY_STEPS):
    """``steps`` steps of LIFTAdamW with backend ``forced`` (lift_kernels.ops.use_backend; None: the
    default choice) on a copy of ``model``, two LIFT groups with their own lr and a scheduler,
    refreshes every 3 steps; returns the parameters after each step. svd="exact": the selection is the reference's under every
    backend, so differences come from the step and the remap."""
    import copy

    import lift_kernels as lk

    model = copy.deepcopy(model).to(device, dtype)
    groups = [
        {"params": [model.up.weight], "lift": True, "lr": 2e-2},
        {"params": [model.down.weight], "lift": True, "lr": 5e-3, "weight_decay": 0.0},
        {"params": [model.up.bias, *model.norm.parameters()], "lift": False},
    ]
    opt = lk.LIFTAdamW(groups, rank=2, lra_rank=3, update_interval=3, svd="exact", weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.8**s, lambda s: 1.0 + s, lambda s: 1.0])
    g = torch.Generator().manual_seed(1)
    trajectory = []
    with lk.ops.use_backend(forced):
        for _ in range(steps):
            x, y = (t.to(device, dtype) for t in make_batch(generator=g))
            loss_step(model, opt, x, y)
            sched.step()
            trajectory.append([p.detach().clone() for p in model.parameters()])
    return trajectory
