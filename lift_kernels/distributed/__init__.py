"""LIFT on torch.distributed: DDP (broadcast selections, sparse gradient all-reduce) and FSDP2
(row-sharded selection and state, sharded checkpoints). See the README, "Multi-GPU training".

Its LIFTAdamW (optimizer.py, the public ``lk.LIFTAdamW``) is lift_kernels.optim's optimizer on
this package's strategy (strategy.py): dependencies point one way, from here to lift_kernels.optim.
The checkpoint functions (torch.distributed.checkpoint takes a second to import) load on first use.
"""
from .broadcast_selection import SelectionFailedElsewhere
from .ddp_hook import SparseAllreduceState, sparse_allreduce, sparse_allreduce_hook
from .optimizer import LIFTAdamW
from .strategy import DistributedStrategy

__all__ = ["DistributedStrategy", "LIFTAdamW", "SelectionFailedElsewhere", "SparseAllreduceState",
           "load_checkpoint", "save_checkpoint", "sparse_allreduce", "sparse_allreduce_hook"]


def __getattr__(name: str):
    if name in ("save_checkpoint", "load_checkpoint"):
        from . import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
