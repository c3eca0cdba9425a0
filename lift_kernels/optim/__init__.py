from .lift_adamw import LIFTAdamW
from .param_groups import lift_param_groups

__all__ = ["LIFTAdamW", "lift_param_groups"]
