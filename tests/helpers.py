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
