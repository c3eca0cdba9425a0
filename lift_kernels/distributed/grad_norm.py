"""The total gradient norm when some gradients are row shards (FSDP2) spread over ranks."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor

from .placement import is_dtensor


def shard_group(p: Tensor):
    """The group over which ``p``'s gradient is split into shards, or None if this rank holds it all."""
    if not is_dtensor(p):
        return None
    from torch.distributed.tensor import Replicate
    if all(isinstance(pl, Replicate) for pl in p.placements):
        return None
    return p.device_mesh.get_group()


def sharded_total_norm(parts: list[Tensor], groups: list, norm_type: float) -> Tensor:
    """Norm of all ``parts`` together; a part with a group is this rank's share of a split tensor.

    Per group, the shares' sums of |g|^p (or maxima, for the inf-norm) are all-reduced once, so every
    rank gets the same total as if the gradients were whole.
    """
    p = float(norm_type)
    device = parts[0].device
    by_group: dict = {}
    for g, grp in zip(parts, groups):
        x = g.detach().float().abs()
        piece = x.max() if (math.isinf(p) and x.numel()) else (x.pow(p).sum() if x.numel() else torch.zeros(()))
        acc = by_group.get(grp)
        piece = piece.to(device)
        by_group[grp] = piece if acc is None else (torch.maximum(acc, piece) if math.isinf(p) else acc + piece)
    total = torch.zeros((), device=device)
    for grp, acc in by_group.items():
        if grp is not None:
            dist.all_reduce(acc, op=dist.ReduceOp.MAX if math.isinf(p) else dist.ReduceOp.SUM, group=grp)
        total = torch.maximum(total, acc) if math.isinf(p) else total + acc
    return total if math.isinf(p) else total.pow(1.0 / p)
