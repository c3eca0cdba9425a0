"""Where a weight lives across processes: plain (one copy per rank) or rows sharded by FSDP2.

FSDP2's ``fully_shard`` turns each parameter into a DTensor sharded on dim 0 of a 1-D DeviceMesh:
the rank at mesh coordinate c holds rows ``torch.chunk(range(m), world)[c]``. LIFT state of such a
weight covers that rank's rows only, and its ``idx`` are flat indices into the *local* shard
(row-major over the local rows), so the sparse step runs on the local tensor unchanged. Global flat
index = local flat index + row_offset * n.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    DTensor = _dtensor_type()
    return DTensor is not None and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The tensor this rank holds: a DTensor's local shard (a view that in-place updates reach)."""
    return t.to_local() if is_dtensor(t) else t


@dataclass(frozen=True)
class RowShard:
    """This rank's block of rows of a dim-0-sharded (m, n) weight and the group that shares it."""

    group: object  # the mesh's ProcessGroup
    position: int  # mesh coordinate: blocks are ordered by it
    world: int
    row_offset: int
    rows: int
    shape: tuple[int, int]  # global (m, n)

    @property
    def flat_offset(self) -> int:
        return self.row_offset * self.shape[1]

    def all_reduce(self, t: Tensor, op=None) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)
        return t

    def gather_rows(self, per_rank: Tensor) -> Tensor:
        """(world, *per_rank.shape): every rank's ``per_rank``, ordered by mesh position."""
        table = torch.zeros((self.world, *per_rank.shape), dtype=per_rank.dtype, device=per_rank.device)
        table[self.position] = per_rank
        return self.all_reduce(table)


def chunk_rows(m: int, world: int, position: int) -> tuple[int, int]:
    """(row_offset, rows) of block ``position`` when m rows are split like torch.chunk."""
    size = -(-m // world) if m else 0
    start = min(position * size, m)
    return start, min(size, m - start)


def row_shard(p: Tensor) -> RowShard | None:
    """The row block this rank holds of ``p``, or None for a plain (unsharded) tensor."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate, Shard
    mesh, placements = p.device_mesh, tuple(p.placements)
    if all(isinstance(pl, Replicate) for pl in placements):
        return None  # every rank holds the whole weight: handled like a DDP replica
    if mesh.ndim != 1 or placements != (Shard(0),):
        raise NotImplementedError(
            f"LIFTAdamW supports DTensor weights sharded on dim 0 of a 1-D mesh (FSDP2's "
            f"fully_shard); got placements {placements} on a {mesh.ndim}-D mesh")
    m, n = p.shape
    position, world = mesh.get_local_rank(), mesh.size()
    offset, rows = chunk_rows(m, world, position)
    local = p.to_local()
    if tuple(local.shape) != (rows, n):
        raise NotImplementedError(f"unexpected shard layout: local shape {tuple(local.shape)}, "
                                  f"expected {(rows, n)} for block {position} of {world}")
    return RowShard(mesh.get_group(), position, world, offset, rows, (m, n))


def replica_group(selection_group):
    """The group whose ranks hold identical copies of plain weights, or None outside distributed runs.

    ``selection_group`` is LIFTAdamW's option: "world" (the default group once torch.distributed is
    initialized), a ProcessGroup, or None (every rank selects on its own, e.g. pipeline stages that
    hold different weights).
    """
    if selection_group is None or not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if selection_group == "world" else selection_group
    return group if dist.get_world_size(group) > 1 else None
