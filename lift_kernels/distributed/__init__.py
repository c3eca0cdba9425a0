"""LIFT on torch.distributed: DDP (broadcast selections, sparse gradient all-reduce) and FSDP2
(row-sharded selection and state, sharded checkpoints). See the README, "Multi-GPU training".

The optimizer imports placement and route from here, so nothing in this package imports
lift_kernels.optim at module level, and the checkpoint functions (torch.distributed.checkpoint
takes a second to import) load on first use.
"""
from .ddp_hook import SparseAllreduceState, sparse_allreduce, sparse_allreduce_hook

__all__ = ["SparseAllreduceState", "load_checkpoint", "save_checkpoint", "sparse_allreduce",
           "sparse_allreduce_hook"]


def __getattr__(name: str):
    if name in ("save_checkpoint", "load_checkpoint"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
