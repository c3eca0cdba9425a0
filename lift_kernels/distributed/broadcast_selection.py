"""Selections of replicated (DDP) weights: made once on the group's first rank and broadcast.

Every rank holds the same weights, but kernels (GPU reductions, SVD) need not be bitwise
deterministic; one computed copy guarantees that no rank trains other entries than the rest.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor


def broadcast_indices(compute: Callable[[], Tensor], batch: int, k: int, device: torch.device,
                      group) -> Tensor:
    """(batch, k) int32 indices: ``compute()`` on group rank 0, received everywhere else."""
    if dist.get_rank(group) == 0:
        idx = compute().reshape(batch, k).to(torch.int32).contiguous()
    else:
        idx = torch.empty(batch, k, dtype=torch.int32, device=device)
    dist.broadcast(idx, src=dist.get_global_rank(group, 0), group=group)
    return idx
