"""The ops of lift_kernels, as torch ops: ``torch.ops.lift_kernels.<name>``.

- library.py: every op defined once: schema, fake implementation, pure-torch reference (the
  default kernel on every device);
- backends.py: which backend (reference, triton, native) runs each op on each device and why, and
  the torch.library registration of its kernels (LIFT_BACKEND, use_backend);
- native.py: the compiled kernels of lift_kernels._C with their ops' signatures;
- public.py: the public ops as documented functions (signature from the schema, docstring from library.py).

The public functions below call the ops ``torch.ops.lift_kernels.<name>`` and nothing else.
"""
from . import library
from .backends import BACKENDS, BackendUnavailableError, chosen, forced_backend, forced_origin, use_backend
from .public import public

sparse_adamw_step = public("sparse_adamw_step")
sparse_adamw8bit_step = public("sparse_adamw8bit_step")
remap_state = public("remap_state")
principal_weights = public("principal_weights")
sampled_weight_grad = public("sampled_weight_grad")

OPS = library.PUBLIC

use_backend()  # LIFT_BACKEND as set when lift_kernels is imported

__all__ = ["BACKENDS", "OPS", "BackendUnavailableError", "chosen", "forced_backend", "forced_origin",
           "principal_weights", "remap_state", "sampled_weight_grad", "sparse_adamw8bit_step", "sparse_adamw_step",
           "use_backend"]
