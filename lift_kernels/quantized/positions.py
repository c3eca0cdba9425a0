"""The positions of a sparse delta: checks of new ones and their union with the old (grow)."""
from __future__ import annotations

import torch
from torch import Tensor


def check_positions(new_positions: Tensor, size: int, device: torch.device) -> None:
    """ValueError naming ``new_positions`` unless it is int32, 1-D, strictly increasing, in [0, size)."""
    what = "LIFTQuantLinear.grow: new_positions"
    if not isinstance(new_positions, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of int32 flat indices, got {type(new_positions).__name__}")
    if new_positions.dtype != torch.int32 or new_positions.dim() != 1:
        raise ValueError(f"{what} must be a 1-D int32 tensor, got {new_positions.dtype} of shape "
                         f"{tuple(new_positions.shape)} (pass positions.to(torch.int32))")
    if new_positions.device != device:
        raise ValueError(f"{what} is on {new_positions.device}, the delta on {device}; move it there")
    if new_positions.numel() == 0:
        return
    lo, hi = int(new_positions.min()), int(new_positions.max())
    if lo < 0 or hi >= size:
        raise ValueError(f"{what} must lie in [0, out_features*in_features) = [0, {size}), got values in [{lo}, {hi}]")
    if new_positions.numel() > 1 and not bool((new_positions[1:] > new_positions[:-1]).all()):
        raise ValueError(f"{what} must be sorted and without duplicates (strictly increasing); "
                         "pass torch.unique(positions) (it sorts)")


def union(old: Tensor, new: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(positions, slots, old_to_new): the sorted union of two sorted int32 position vectors, where
    each of ``new`` lands in it (int32) and where each of ``old`` lands in it (int64)."""
    positions = torch.unique(torch.cat([old, new])).to(torch.int32)
    slots = torch.searchsorted(positions, new).to(torch.int32)
    old_to_new = torch.searchsorted(positions, old).to(torch.int64)
    return positions, slots, old_to_new
