"""``lk.info()``: what is built, which backend each op uses on each device, and why.

A package rather than a module so that ``python -m lift_kernels.info`` (its __main__.py) runs without
runpy's "found in sys.modules" RuntimeWarning: ``import lift_kernels`` imports this for ``lk.info``,
and runpy warns only when the module it is asked to run was imported already, not a package."""
from __future__ import annotations

import torch

from .. import __version__, _ext, _triton_loader, ops
from ..ops import native


def info() -> dict:
    triton_ok, triton_why = _triton_loader.triton_usable()
    ops_info = {op: {dev: dict(zip(("backend", "why"), ops.chosen(op, dev))) for dev in ops.backends.devices()}
                for op in ops.OPS}
    return {
        "version": __version__,
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "extension": {**_ext.describe(), "kernels": native.kernels()},
        "triton": {"usable": triton_ok, "why": triton_why, "interpret": _triton_loader.interpreting()},
        "forced_backend": ops.forced_backend(),
        "forced_by": ops.forced_origin(),  # "LIFT_BACKEND=..." or "use_backend(...)"
        "ops": ops_info,
    }
