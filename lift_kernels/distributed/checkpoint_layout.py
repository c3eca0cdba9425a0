"""How LIFT state is laid out in a sharded checkpoint, independent of the ranks that wrote it.

A LIFT weight's k selected entries, sorted by *global* flat index, form one length-k vector per
field (``idx`` as global int32 flat indices, ``exp_avg``, ``exp_avg_sq``, ``master``). Since FSDP2
gives each rank a block of rows and indices are sorted, each rank's entries are one contiguous
range of those vectors: [rowptr[row_offset], rowptr[row_offset + rows]), where ``rowptr`` (m + 1
int64, saved beside them) counts the selected entries before each row. A writer saves its range as
a shard of the vector; a reader on any number of ranks computes its own range from rowptr and asks
torch.distributed.checkpoint for that range, which it assembles from whatever shards were written.
Weights held whole (DDP, one process) save and load the whole vectors.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .placement import RowShard

FIELDS = ("idx", "exp_avg", "exp_avg_sq", "master")


def rowptr_of(local_idx: Tensor, shard: RowShard | None, shape: tuple[int, int]) -> Tensor:
    """Selected entries before each row, over the whole matrix (all-reduced across row blocks)."""
    m, n = shape
    counts = torch.zeros(m, dtype=torch.int64, device=local_idx.device)
    offset = shard.row_offset if shard is not None else 0
    rows = local_idx.long() // n + offset
    counts.index_add_(0, rows, torch.ones_like(rows))
    if shard is not None:
        shard.all_reduce(counts)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def my_range(rowptr: Tensor, shard: RowShard | None) -> tuple[int, int]:
    if shard is None:
        return 0, int(rowptr[-1])
    return int(rowptr[shard.row_offset]), int(rowptr[shard.row_offset + shard.rows])


def range_tensor(local: Tensor, start: int, total: int, shard: RowShard | None):
    """``local`` as entries [start, start + len) of a length-``total`` vector split over the group."""
    if shard is None or total == 0:
        return local
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards
    rank = dist.get_rank(shard.group)
    shards = []
    if local.numel():  # a rank whose rows hold no selected entry contributes no shard
        md = ShardMetadata(shard_offsets=[start], shard_sizes=[local.numel()],
                           placement=f"rank:{rank}/{local.device}")
        shards.append(Shard(local, md))
    return init_from_local_shards(shards, total, process_group=shard.group)
