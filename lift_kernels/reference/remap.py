"""Carry per-entry optimizer state across a re-selection (Algorithm 1, lines 5-11)."""
from __future__ import annotations

import torch
from torch import Tensor


def remap_state(old_idx: Tensor, new_idx: Tensor, states: list[Tensor]) -> list[Tensor]:
    """Map length-k state vectors from ``old_idx`` to ``new_idx``.

    Both index vectors are sorted int32 flat indices into the same weight. An entry selected before
    and after keeps its value; a newly selected entry starts at zero. Works by binary search over the
    old indices, so memory is O(k), never O(m*n).
    """
    if old_idx.numel() == 0 or new_idx.numel() == 0:
        return [torch.zeros(new_idx.numel(), dtype=s.dtype, device=s.device) for s in states]
    pos = torch.searchsorted(old_idx, new_idx).clamp_max_(old_idx.numel() - 1)
    hit = old_idx.index_select(0, pos) == new_idx
    out = []
    for s in states:
        carried = s.index_select(0, pos)
        out.append(torch.where(hit, carried, torch.zeros((), dtype=s.dtype, device=s.device)))
    return out
