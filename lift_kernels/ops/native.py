"""The ``native`` backend: the compiled kernels of lift_kernels._C (C++ on CPU tensors, CUDA on GPU
tensors), as functions with their ops' signatures (lift_kernels/ops/library.py).

_C names each kernel ``<kernel>_<device>`` (csrc/ops.cpp); ``kernel(op, device)`` is the function
lift_kernels.ops.backends registers for an op and a device, or None where _C has none. Where _C is
compiled on first use (``pending()``), backends registers a stand-in that runs ``load()`` first.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from .. import _ext
from ..reference.select import full_rank
from .library import _principal_weights_reference, check_principal_weights_args, draw_seed


def _c_kernel(name: str, device_type: str) -> Callable | None:
    return None if _ext.EXT is None else getattr(_ext.EXT, f"{name}_{device_type}", None)


def _sparse_adamw_step(c_fn, params: list[Tensor], grads: list[Tensor], idxs: list[Tensor], exp_avgs: list[Tensor],
                       exp_avg_sqs: list[Tensor], masters: list[Tensor | None] | None = None, *, step: int,
                       lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    # masters=None is the empty list of the C++ kernel: no weight has a master copy
    c_fn(params, grads, idxs, exp_avgs, exp_avg_sqs, [] if masters is None else masters, step, float(lr), beta1,
         beta2, eps, weight_decay)


def _sparse_adamw8bit_step(c_fn, params: list[Tensor], grads: list[Tensor], idxs: list[Tensor],
                           exp_avg_codes: list[Tensor], exp_avg_scales: list[Tensor], exp_avg_sq_codes: list[Tensor],
                           exp_avg_sq_scales: list[Tensor], masters: list[Tensor | None] | None = None, *,
                           exp_avg_book: Tensor, exp_avg_sq_book: Tensor, step: int, lr: float, beta1: float,
                           beta2: float, eps: float, weight_decay: float) -> None:
    c_fn(params, grads, idxs, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes, exp_avg_sq_scales,
         [] if masters is None else masters, exp_avg_book, exp_avg_sq_book, step, float(lr), beta1, beta2, eps,
         weight_decay)


def _principal_weights(c_fn, W: Tensor, k: int, lra_rank: int, svd: str = "fast", largest: bool = True,
                       generator: torch.Generator | None = None) -> Tensor:
    if svd == "exact" or full_rank(W.shape, lra_rank):  # the reference's by definition (W' = W: top-k of |W|)
        return _principal_weights_reference(W, k, lra_rank, svd, largest, generator)
    check_principal_weights_args(W, k, lra_rank, svd)
    seed = draw_seed(generator)
    idx = c_fn(W if W.dim() == 3 else W.unsqueeze(0), k, lra_rank, largest, seed)
    return idx if W.dim() == 3 else idx[0]


# op -> (_C kernel name without the device suffix, adapter from the op's signature or None)
_KERNELS: dict[str, tuple[str, Callable | None]] = {
    "sparse_adamw_step": ("sparse_adamw_step", _sparse_adamw_step),
    "sparse_adamw8bit_step": ("sparse_adamw8bit_step", _sparse_adamw8bit_step),
    "remap_state": ("remap_state", None),
    "sampled_weight_grad": ("sampled_weight_grad", None),  # its own checks: the reference's, in C++
    "principal_weights": ("principal_weights", _principal_weights),
    "_principal_weights_seeded": ("principal_weights", None),
    "_lowrank": ("lowrank", None),
    "_topk_abs_product": ("topk_abs_product", None),
}


def implements(op: str) -> bool:
    return op in _KERNELS


def kernel(op: str, device_type: str) -> Callable | None:
    """The kernel of ``op`` for ``device_type`` tensors, with the op's signature; None if _C has none."""
    name, adapter = _KERNELS[op]
    c_fn = _c_kernel(name, device_type)
    if c_fn is None or adapter is None:
        return c_fn
    return functools.partial(adapter, c_fn)


def pending() -> bool:
    """Whether _C is compiled (or loaded from its cache) on the first call of a native kernel."""
    return _ext.pending()


def load(verbose: bool = False, retry: bool = False) -> bool:
    """Runs that pending build now; True if _C is loaded (lift_kernels/_ext.py)."""
    return _ext.load(verbose=verbose, retry=retry)


def why_not(op: str, device_type: str) -> str | None:
    """None if _C can run ``op`` on ``device_type`` tensors (or is built on first use), else why not."""
    if _ext.EXT is None:
        return None if _ext.pending() else (_ext.EXT_ERROR or "lift_kernels._C is not built")
    if kernel(op, device_type) is None:
        built = [d for d in ("cpu", "cuda") if kernel(op, d) is not None]
        return (f"lift_kernels._C has no {device_type} kernel for {op} "
                f"({'it has one for ' + ' and '.join(built) + ' tensors only' if built else 'built without it'})")
    return None


def kernels() -> list[str]:
    """"op:device" for every kernel of this build (for lk.info())."""
    return [f"{op}:{dev}" for op in _KERNELS for dev in ("cpu", "cuda") if kernel(op, dev) is not None]
