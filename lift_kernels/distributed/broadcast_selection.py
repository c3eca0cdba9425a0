"""Selections of replicated (DDP) weights: made once on the group's first rank and broadcast.

Every rank holds the same weights, but kernels (GPU reductions, SVD) need not be bitwise
deterministic; one computed copy guarantees that no rank trains other entries than the rest.

If the selection raises on the first rank, the other ranks are already waiting in the broadcast:
the first rank still sends, with a failure flag in the message's last slot, so that they raise too
instead of waiting out the group's timeout (30 minutes by default) while it unwinds.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

_OK, _FAILED = 0, 1


class SelectionFailedElsewhere(RuntimeError):
    """The selecting rank's selection raised; its own error says why."""


def broadcast_indices(compute: Callable[[], Tensor], batch: int, k: int, device: torch.device,
                      group) -> Tensor:
    """(batch, k) int32 indices: ``compute()`` on group rank 0, received everywhere else."""
    message = torch.empty(batch * k + 1, dtype=torch.int32, device=device)
    src = dist.get_global_rank(group, 0)
    if dist.get_rank(group) == 0:
        try:
            message[:-1] = compute().reshape(-1)
            message[-1] = _OK
        except BaseException:
            message[-1] = _FAILED
            dist.broadcast(message, src=src, group=group)
            raise
    dist.broadcast(message, src=src, group=group)
    if int(message[-1]) != _OK:
        raise SelectionFailedElsewhere(
            f"LIFTAdamW: the selection on global rank {src} (which selects for its group) raised; "
            "see that rank's error")
    return message[:-1].view(batch, k)
