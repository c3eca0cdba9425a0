"""Exact global top-k over a matrix whose rows are split across ranks, without gathering it.

Radix select on the float bit patterns: each pass all-reduces a 256-bin histogram of the next 8 bits
of the entries still tied with the threshold's prefix, so 4 passes (8 for fp64) pin the k-th largest
value exactly. Entries above it are selected; of the entries equal to it, the lowest global flat
indices are taken, exactly as reference.select.topk_flat_indices breaks ties. Because rank blocks are
ordered by row, "lowest global index" means: lower mesh positions first, then lower local index.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .placement import RowShard

_BITS = {torch.float32: (torch.int32, 32), torch.float64: (torch.int64, 64)}


def ordered_keys(scores: Tensor) -> tuple[Tensor, int]:
    """Integer keys with the order of the floats (-0.0 equal to +0.0), and their bit width."""
    if scores.dtype not in _BITS:
        scores = scores.float()  # fp16/bf16 -> fp32 is exact and keeps order and ties
    int_dtype, width = _BITS[scores.dtype]
    bits = (scores + 0.0).view(int_dtype)  # + 0.0 turns -0.0 into +0.0, as torch compares them
    magnitude_mask = (1 << (width - 1)) - 1
    return bits ^ ((bits >> (width - 1)) & magnitude_mask), width


def sharded_topk_flat_indices(scores: Tensor, k: int, largest: bool, shard: RowShard) -> list[Tensor]:
    """This rank's share of the global top-k of each matrix in ``scores``.

    ``scores`` is this rank's rows, (rows, n) or (b, rows, n). Returns one sorted int32 tensor of
    local flat indices per matrix; over all ranks each matrix gets exactly k entries.
    """
    b = scores.shape[0] if scores.dim() == 3 else 1
    flat = scores.reshape(b, scores.shape[-2] * scores.shape[-1])
    if k == 0:
        return [torch.empty(0, dtype=torch.int32, device=scores.device) for _ in range(b)]
    keys, width = ordered_keys(flat if largest else -flat)
    unsigned = keys ^ torch.tensor(-(1 << (width - 1)), dtype=keys.dtype, device=keys.device)
    alive = torch.ones_like(keys, dtype=torch.bool)  # entries whose key prefix equals the threshold's
    above = torch.zeros_like(alive)
    need = torch.full((b, 1), k, dtype=torch.int64, device=keys.device)  # still to place at/below it
    for shift in range(width - 8, -1, -8):
        digit = ((unsigned >> shift) & 255).long()
        hist = torch.zeros(b, 256, dtype=torch.int64, device=keys.device)
        hist.scatter_add_(1, digit, alive.long())
        shard.all_reduce(hist)
        at_or_above = hist.flip(1).cumsum(1).flip(1)  # [d]: alive entries with digit >= d
        chosen = (at_or_above >= need).sum(1, keepdim=True) - 1
        strictly_above = torch.where(chosen < 255, at_or_above.gather(1, (chosen + 1).clamp_max(255)), 0)
        need -= strictly_above
        above |= alive & (digit > chosen)
        alive &= digit == chosen
    # ties at the threshold: lower mesh positions take theirs first
    ties_before = shard.gather_rows(alive.sum(1))[: shard.position].sum(0)
    take = (need[:, 0] - ties_before).clamp(min=0)
    chosen_ties = alive & (alive.cumsum(1) <= take[:, None])
    return [torch.nonzero(above[i] | chosen_ties[i]).flatten().to(torch.int32) for i in range(b)]
