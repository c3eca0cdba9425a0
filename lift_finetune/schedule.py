"""Learning-rate schedules: warmup, then linear (the paper's), cosine or constant.

Unlike transformers' schedulers, the first step's LR is not zero: step s of a w-step warmup runs at
(s + 1) / (w + 1) of the peak, so a short run (the CPU default has one warmup step) wastes no step.
"""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak LR at 0-based ``step`` of ``total``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # 0 at the end of warmup, < 1 on the last step
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def build(optimizer: torch.optim.Optimizer, schedule: str, warmup: int, total: int):
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step, warmup, total))


def warmup_steps(warmup: float, total: int) -> int:
    """--warmup: a fraction of ``total`` below 1, else a number of steps."""
    return int(round(warmup * total)) if warmup < 1 else int(warmup)
