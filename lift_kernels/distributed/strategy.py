"""LIFTAdamW's strategy under torch.distributed (see lift_kernels/optim/strategy.py).

- plain weights outside a multi-rank run: as in one process;
- plain weights replicated across the ranks of ``selection_group`` (DDP): selected on its first
  rank and broadcast (broadcast_selection.py);
- DTensor weights sharded on rows (FSDP2): selected collectively, each rank scoring its own rows with
  the optimizer's own selectors (sharded_select.py); gradient norms and finiteness flags reduced
  over the shards' groups (grad_norm.py).

lift_kernels.distributed.optimizer builds the public LIFTAdamW on this strategy.
"""
from __future__ import annotations

from functools import partial

import torch.distributed as dist
from torch import Tensor

from ..optim.selection import Chunk
from ..optim.strategy import LocalStrategy
from .broadcast_selection import broadcast_indices
from .grad_norm import shard_group, sharded_total_norm
from .placement import is_dtensor, local_tensor, replica_group, row_shard
from .sharded_select import sharded_indices


class DistributedStrategy(LocalStrategy):
    """Decides at each call from the weights and the state of torch.distributed, so one optimizer
    works before and after init_process_group, and on plain and DTensor weights."""

    process_groups = (dist.ProcessGroup,) if dist.is_available() else ()

    def local(self, t: Tensor) -> Tensor:
        return local_tensor(t)

    def is_dtensor(self, p: Tensor) -> bool:
        return is_dtensor(p)

    def replicated(self) -> bool:
        return replica_group(self.selection_group) is not None

    def side_by_side(self) -> bool:
        return not (dist.is_available() and dist.is_initialized())

    def select(self, chunk: Chunk) -> list[Tensor]:
        shard = row_shard(chunk.params[0])
        if shard is not None:
            return sharded_indices(chunk, shard)
        replicas = replica_group(self.selection_group)
        if replicas is None:
            return super().select(chunk)  # replicated DTensors too: local() is the whole weight
        return list(broadcast_indices(partial(self.whole_indices, chunk), len(chunk.params), chunk.k,
                                      chunk.params[0].device, replicas))

    def total_norm(self, parts: list[Tensor], params: list[Tensor], norm_type: float) -> Tensor:
        groups = [shard_group(p) for p in params]
        if all(g is None for g in groups):
            return super().total_norm(parts, params, norm_type)
        return sharded_total_norm(parts, groups, norm_type)

    def all_finite(self, flag: Tensor, params: list[Tensor]) -> bool:
        if any(is_dtensor(p) for p in params):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag)
