"""The ops of lift_kernels, as torch ops: ``torch.ops.lift_kernels.<name>``.

- library.py: every op defined once: schema, fake implementation, pure-torch reference (the
  default kernel on every device);
- backends.py: which backend (reference, triton, native) runs each op on each device and why, and
  the torch.library registration of its kernels (LIFT_BACKEND, use_backend);
- native.py: the compiled kernels of lift_kernels._C with their ops' signatures.

The public functions below are the ops themselves (their schemas give the Python signatures and
keyword arguments; see lift_kernels.reference for the semantics of each).
"""
import torch

from . import library
from .backends import BACKENDS, BackendUnavailableError, chosen, forced_backend, use_backend

sparse_adamw_step = torch.ops.lift_kernels.sparse_adamw_step
remap_state = torch.ops.lift_kernels.remap_state
principal_weights = torch.ops.lift_kernels.principal_weights

OPS = library.PUBLIC

use_backend()  # LIFT_BACKEND as set when lift_kernels is imported

__all__ = ["BACKENDS", "OPS", "BackendUnavailableError", "chosen", "forced_backend", "principal_weights",
           "remap_state", "sparse_adamw_step", "use_backend"]
