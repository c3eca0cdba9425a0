"""Checks of LIFTAdamW hyperparameters: each error names the parameter and the fix."""
from __future__ import annotations

import torch

from ..reference.select import SELECTORS, SVD_MODES


def check_hyperparameters(group: dict) -> None:
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr must be a float or a one-element tensor, got shape {tuple(lr.shape)}")
    if float(lr) < 0.0:
        raise ValueError(f"lr must be >= 0, got {float(lr)}")
    if not 0.0 <= group["eps"]:
        raise ValueError(f"eps must be >= 0, got {group['eps']}")
    b1, b2 = group["betas"]
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must each be in [0, 1), got {group['betas']}")
    if group["weight_decay"] < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    if not isinstance(group["rank"], int) or group["rank"] < 1:
        raise ValueError(f"rank must be an integer >= 1 (the LoRA-equivalent budget), got {group['rank']!r}")
    density = group["density"]
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1] or None (then rank sets the budget), got {density}")
    if not isinstance(group["lra_rank"], int) or group["lra_rank"] < 1:
        raise ValueError(f"lra_rank must be an integer >= 1, got {group['lra_rank']!r}")
    if not isinstance(group["update_interval"], int) or group["update_interval"] < 1:
        raise ValueError(f"update_interval must be an integer >= 1 (steps between re-selections), "
                         f"got {group['update_interval']!r}")
    if group["selector"] not in SELECTORS:
        raise ValueError(f"selector must be one of {SELECTORS}, got {group['selector']!r}")
    if group["svd"] not in SVD_MODES:
        raise ValueError(f"svd must be one of {SVD_MODES}, got {group['svd']!r}")
    if group["lift"] not in (None, True, False):
        raise ValueError(f"lift must be True, False or None (2-D tensors), got {group['lift']!r}")


def check_lift_param(p: torch.Tensor, name: str, group: dict) -> None:
    if p.dim() != 2:
        raise ValueError(
            f"LIFT weights must be 2-D matrices, but {name} has shape {tuple(p.shape)}; put it in a "
            "group with lift=False (dense AdamW) or leave lift unset so only 2-D tensors use LIFT")
    if not p.is_contiguous():
        raise ValueError(f"LIFT weight {name} must be contiguous (flat indices address its storage); "
                         "call .data = .data.contiguous() on it before building the optimizer")
    if p.numel() >= 2**31:
        raise ValueError(f"LIFT weight {name} has {p.numel()} entries; int32 indices allow < 2**31")
    m, n = p.shape
    if group["selector"] == "lift" and group["lra_rank"] > min(m, n):
        raise ValueError(f"lra_rank={group['lra_rank']} exceeds min(m, n)={min(m, n)} of {name} "
                         f"(shape {m}x{n}); lower lra_rank for this group")


def budget(shape: torch.Size, rank: int, density: float | None) -> int:
    """Selected entries per matrix: LoRA's count at ``rank``, or ``density`` of the entries."""
    m, n = shape
    if density is not None:
        return int(round(density * m * n))
    return min((m + n) * rank, m * n)
