"""Selections of row-sharded (FSDP2) weights: each rank scores its own rows, top-k is collective."""
from __future__ import annotations

import torch
from torch import Tensor

from .placement import RowShard, local_tensor
from .sharded_lowrank import sharded_exact_lowrank, sharded_fast_lowrank
from .sharded_topk import sharded_topk_flat_indices


def stack(ts: list[Tensor]) -> Tensor:
    """One matrix as it is, several as a batch (the shapes the single-process selection uses)."""
    return ts[0] if len(ts) == 1 else torch.stack(ts)


def sharded_indices(group: dict, chunk: list[Tensor], k: int, generator: torch.Generator,
                    grads: dict | None, shard: RowShard) -> list[Tensor]:
    """Local flat indices (sorted int32) of this rank's share of each weight's k selected entries.

    Same scores as selection.local_indices, restricted to this rank's rows; random streams (sketch,
    random selector) are drawn for the whole matrix from the same generator, so they match the
    single-process run.
    """
    A = stack([local_tensor(p).detach() for p in chunk])
    selector, largest = group["selector"], group["largest"]
    if selector == "lift":
        lowrank = sharded_fast_lowrank if group["svd"] == "fast" else sharded_exact_lowrank
        args = (generator,) if group["svd"] == "fast" else ()
        L, R = lowrank(A, group["lra_rank"], shard, *args)
        scores = (L @ R).abs_()
    elif selector == "magnitude":
        scores = A.abs()
    elif selector == "gradient":
        if grads is None or any(grads.get(p) is None for p in chunk):
            raise RuntimeError("selector='gradient' needs the dense gradient of the selecting step")
        scores = stack([local_tensor(grads[p]) for p in chunk]).abs()
    elif selector == "random":
        full = torch.rand((*A.shape[:-2], *shard.shape), generator=generator, device="cpu")
        scores = full[..., shard.row_offset:shard.row_offset + shard.rows, :].to(A.device)
        largest = True
    else:
        raise ValueError(f"unknown selector {selector!r}")
    return sharded_topk_flat_indices(scores, k, largest, shard)
