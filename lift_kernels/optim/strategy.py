"""How LIFTAdamW runs across processes: the strategy it calls, and the single-process one.

The optimizer knows nothing of DDP or FSDP; it asks its strategy:

- ``local(t)``: the part of a tensor this process holds (a DTensor's local rows; ``idx`` address it);
- ``is_dtensor(p)``: whether ``p`` is a DTensor, whose gradient is complete only after accumulation
  (it is selected and gathered then, never before);
- ``replicated()``: whether plain weights are copies held by several processes (DDP averages their
  gradients after the hooks, so the hooks leave those gradients alone);
- ``select(chunk)``: the selections of a :class:`~.selection.Chunk` (here: computed in this process;
  under DDP: on the first rank and broadcast; on FSDP2 row shards: collectively, each rank its rows);
- ``side_by_side()``: whether independent chunks may be selected concurrently (no collectives);
- ``total_norm(parts, params, norm_type)`` and ``all_finite(flag, params)``: the gradient norm and
  finiteness, reduced over the processes that share the parameters.

The optimizer builds its strategy from its class: ``LIFTAdamW.Strategy(selection_group)``. The
optimizer of lift_kernels.optim is the single-process one (LocalStrategy); lift_kernels.distributed
derives the public ``lk.LIFTAdamW`` from it with its own strategy (no registry: whoever imports
both chooses, and dependencies point one way, from distributed to optim).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .selection import Chunk


class LocalStrategy:
    """One process holds every weight whole and selects alone."""

    process_groups: tuple[type, ...] = ()  # what selection_group may be besides "world" and None

    def __init__(self, selection_group="world"):
        check_selection_group(selection_group, self.process_groups)
        self.selection_group = selection_group

    def local(self, t: Tensor) -> Tensor:
        return t

    def is_dtensor(self, p: Tensor) -> bool:
        return False

    def replicated(self) -> bool:
        return False

    def side_by_side(self) -> bool:
        return True

    def whole_indices(self, chunk: Chunk) -> Tensor:
        """(b, k) or (k,) indices of the chunk's weights, computed here from the whole matrices."""
        return chunk.whole_indices(*chunk.stacked(self.local))

    def select(self, chunk: Chunk) -> list[Tensor]:
        return list(self.whole_indices(chunk).reshape(len(chunk.params), chunk.k))

    def total_norm(self, parts: list[Tensor], params: list[Tensor], norm_type: float) -> Tensor:
        """The norm of all ``parts`` (this process's gradients of ``params``) together."""
        norms = [torch.linalg.vector_norm(g, norm_type, dtype=torch.float32) for g in parts]
        return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)

    def all_finite(self, flag: Tensor, params: list[Tensor]) -> bool:
        """``flag`` (int32, 1 if this process's gradients of ``params`` are finite) for all processes."""
        return bool(flag)


def check_selection_group(selection_group, process_groups: tuple[type, ...] = ()) -> None:
    """LIFTAdamW's ``selection_group``: "world", None, or (where a strategy takes them) a process group."""
    if selection_group is None or isinstance(selection_group, process_groups) or selection_group == "world":
        return
    raise ValueError(f"selection_group must be 'world', None (each rank selects alone) or a "
                     f"torch.distributed ProcessGroup, got {selection_group!r}")
