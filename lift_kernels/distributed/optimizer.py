"""The public LIFTAdamW: lift_kernels.optim's optimizer on the multi-process strategy.

The strategy decides at each call from the weights and from torch.distributed (strategy.py), so one
optimizer works in a single process (where it does what the single-process strategy does, bit for
bit), before and after init_process_group, under DDP and on FSDP2 row shards.
"""
from __future__ import annotations

from ..optim import lift_adamw
from .strategy import DistributedStrategy


class LIFTAdamW(lift_adamw.LIFTAdamW):
    __doc__ = lift_adamw.LIFTAdamW.__doc__
    Strategy = DistributedStrategy
