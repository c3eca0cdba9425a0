"""Pure-torch reference implementations of every lift_kernels op.

Each function here is at once the CPU fallback, the oracle the kernels are tested against and the
baseline the benchmarks compare with. They favour clarity over speed, but never build an m x n
mask or dense moment: state is always the length-k vectors LIFT promises.
"""
from .lowrank import exact_lowrank, fast_lowrank
from .remap import remap_state
from .sampled_grad import sampled_weight_grad
from .select import principal_weights, topk_flat_indices
from .sparse_adamw import sparse_adamw_step
from .sparse_adamw8bit import sparse_adamw8bit_step

__all__ = [
    "exact_lowrank",
    "fast_lowrank",
    "principal_weights",
    "remap_state",
    "sampled_weight_grad",
    "sparse_adamw8bit_step",
    "sparse_adamw_step",
    "topk_flat_indices",
]
