"""Small models, runs and files for the checkpoint and delta damage tests, plus a state snapshot.

Everything is tiny (two Linear layers) so a test can write, damage and reload hundreds of files.
"""
from __future__ import annotations

import copy
import random

import torch
from torch import nn

import lift_kernels as lk
from lift_kernels._digest import structure_digest
from lift_finetune import checkpoint, schedule


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 12, bias=False))


def small_run(seed: int = 0):
    """(model, LIFTAdamW, LR scheduler) as lift-finetune builds them, before any step."""
    model = small_model(seed)
    opt = lk.LIFTAdamW(lk.lift_param_groups(model), lr=1e-2, rank=1, lra_rank=1, update_interval=2, seed=3)
    return model, opt, schedule.build(opt, "linear", 1, 10)


def train_steps(model, opt, sched, steps: int) -> None:
    gen = torch.Generator().manual_seed(7)
    for _ in range(steps):
        model(torch.randn(4, 12, generator=gen)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


def extra(step: int) -> dict:
    """The run record lift-finetune stores in every checkpoint."""
    return {"fingerprint": {"lr": 1e-2, "seed": 3}, "history": [{"step": s + 1, "loss": 1.0 / (s + 1)}
                                                             for s in range(step)], "base_eval": None}


def write_checkpoint(folder: str, steps: int = 3) -> str:
    model, opt, sched = small_run()
    train_steps(model, opt, sched, steps)
    return checkpoint.save(folder, steps, model, opt, sched, extra(steps), torch.device("cpu"))


def snapshot(model, opt=None, sched=None) -> str:
    """A hash of everything a load may change: weights, optimizer, scheduler and the global RNGs."""
    state = {"model": {k: v.clone() for k, v in model.state_dict().items()},
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    if opt is not None:
        state["optimizer"] = copy.deepcopy(opt.state_dict())
    if sched is not None:
        state["scheduler"] = sched.state_dict()
    return structure_digest(state)
