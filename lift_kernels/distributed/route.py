"""Which of three ways makes the selection of a chunk of same-shaped weights.

- plain tensors outside a multi-rank run: computed here (the single-process path, unchanged);
- plain tensors replicated across ranks (DDP): computed on one rank and broadcast;
- DTensors sharded on rows (FSDP2): computed collectively, each rank getting its own rows' share.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .broadcast_selection import broadcast_indices
from .placement import local_tensor, replica_group, row_shard
from .sharded_select import sharded_indices, stack


def chunk_indices(group: dict, chunk: list[Tensor], k: int, generator: torch.Generator,
                  grads: dict | None, compute_local: Callable[[Tensor, Tensor | None], Tensor],
                  selection_group="world") -> list[Tensor]:
    """One sorted int32 index tensor per weight of ``chunk`` (local flat indices for shards).

    ``compute_local(W, grad)`` is the single-process selection of a stacked chunk.
    """
    shard = row_shard(chunk[0])
    if shard is not None:
        return sharded_indices(group, chunk, k, generator, grads, shard)

    def compute() -> Tensor:
        grad = stack([local_tensor(grads[p]) for p in chunk]) if group["selector"] == "gradient" else None
        return compute_local(stack([local_tensor(p).detach() for p in chunk]), grad)  # replicated DTensors too

    replicas = replica_group(selection_group)
    if replicas is None:
        return list(compute().reshape(len(chunk), k))
    return list(broadcast_indices(compute, len(chunk), k, chunk[0].device, replicas))
