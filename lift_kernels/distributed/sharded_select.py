"""Selections of row-sharded (FSDP2) weights: each rank scores its own rows, top-k is collective.

The scores are the optimizer's own selectors (lift_kernels.optim.selection) applied to this rank's
rows: random streams (the sketch, the random selector) are drawn for the whole matrix from the
chunk's generator and restricted to the rows, so they match the single-process run, and the lift
selector's low-rank factors come from sharded_lowrank.
"""
from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ..optim.selection import Chunk, Matrices
from .placement import RowShard, local_tensor
from .sharded_lowrank import sharded_exact_lowrank, sharded_fast_lowrank
from .sharded_topk import sharded_topk_flat_indices


def _lowrank(shard: RowShard, A: Tensor, rank: int, svd: str, generator: torch.Generator | None):
    if svd == "fast":
        return sharded_fast_lowrank(A, rank, shard, generator)
    return sharded_exact_lowrank(A, rank, shard)


def sharded_indices(chunk: Chunk, shard: RowShard) -> list[Tensor]:
    """Local flat indices (sorted int32) of this rank's share of each weight's k selected entries."""
    A, grad = chunk.stacked(local_tensor)
    rows = Matrices(A, grad, chunk.group, chunk.generator, shape=(*A.shape[:-2], *shard.shape),
                    rows=slice(shard.row_offset, shard.row_offset + shard.rows),
                    lowrank=partial(_lowrank, shard))
    return sharded_topk_flat_indices(chunk.scores(rows), chunk.k, chunk.largest, shard)
