"""Loads the compiled extension ``lift_kernels._C`` if it was built, with one clear warning if not."""
from __future__ import annotations

import os
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which _C links against)

EXT = None
EXT_ERROR: str | None = None

if os.environ.get("LIFT_NO_NATIVE", "0") == "1":
    EXT_ERROR = "native build skipped (LIFT_NO_NATIVE=1 at install time or now)"
else:
    try:
        from . import _C as EXT  # noqa: N811  (registers the torch.ops.lift_kernels ops)
        from . import _fake_impls  # noqa: F401
    except ImportError as exc:  # not built, or built against another torch
        EXT_ERROR = f"lift_kernels._C could not be loaded ({exc})"
        warnings.warn(
            f"{EXT_ERROR}; using the pure-torch reference ops. Reinstall with "
            "`pip install --no-build-isolation .` to build the extension.",
            RuntimeWarning,
            stacklevel=2,
        )


def has_native_op(name: str, device_type: str) -> bool:
    """Whether ``torch.ops.lift_kernels.<name>`` has a kernel for ``device_type`` ('cpu' or 'cuda')."""
    if EXT is None:
        return False
    return bool(EXT.has_kernel(name, device_type))
