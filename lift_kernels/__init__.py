"""lift_kernels: LIFT (Low-rank Informed Sparse Fine-Tuning) as a fast drop-in torch optimizer."""
__version__ = "0.1.0"

from . import _ext  # noqa: E402,F401  (loads lift_kernels._C or warns once)
from .delta import DeltaError, apply_delta, remove_delta, save_delta  # noqa: E402
from .info import info  # noqa: E402
from .ops import principal_weights, remap_state, sparse_adamw8bit_step, sparse_adamw_step  # noqa: E402
from .optim import lift_param_groups  # noqa: E402
from . import quantized  # noqa: E402,F401  (imports bitsandbytes only once a bnb layer is wrapped)
from .distributed import LIFTAdamW, sparse_allreduce_hook  # noqa: E402  (LIFTAdamW on every strategy)

__all__ = ["DeltaError", "LIFTAdamW", "apply_delta", "info", "lift_param_groups", "principal_weights", "quantized",
           "remap_state", "remove_delta", "save_delta", "sparse_adamw8bit_step", "sparse_adamw_step",
           "sparse_allreduce_hook", "__version__"]
