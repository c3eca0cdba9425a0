"""LIFT on torch.distributed: DDP (broadcast selections, sparse gradient all-reduce) and FSDP2
(row-sharded selection and state, sharded checkpoints). See the README, "Multi-GPU training".

Importing this package registers its strategy with the optimizer (strategy.py): dependencies point
one way, from here to lift_kernels.optim. The checkpoint functions (torch.distributed.checkpoint
takes a second to import) load on first use.
"""
from . import strategy  # noqa: F401  (registers DistributedStrategy with LIFTAdamW)
from .ddp_hook import SparseAllreduceState, sparse_allreduce, sparse_allreduce_hook

__all__ = ["SparseAllreduceState", "load_checkpoint", "save_checkpoint", "sparse_allreduce",
           "sparse_allreduce_hook"]


def __getattr__(name: str):
    if name in ("save_checkpoint", "load_checkpoint"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
