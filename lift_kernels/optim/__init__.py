"""The LIFT optimizer in one process: LIFTAdamW (lk.LIFTAdamW adds the multi-process strategy), its
selection, state, gradients and checkpoints, and lift_param_groups."""
from .lift_adamw import LIFTAdamW
from .param_groups import lift_param_groups

__all__ = ["LIFTAdamW", "lift_param_groups"]
