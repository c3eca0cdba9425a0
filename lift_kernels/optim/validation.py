"""Checks of LIFTAdamW hyperparameters: each error names the parameter and the fix."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .moments import check_moment_bits
from .quant_weights import check_quant_param, is_quant, matrix_shape
from .selection import check_selection, is_int, needs_grad, real

__all__ = ["check_finite_weights", "check_flag", "check_hyperparameters", "check_lift_param", "check_seed",
           "check_step_dtypes", "check_unchanged_shape"]

# Weight dtypes the LIFT kernels update (fp32 moments; fp32 masters for the half-precision ones).
LIFT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# torch.optim.AdamW's options that LIFTAdamW takes only at their off value, and why.
_OFF_ONLY = {
    "amsgrad": "LIFTAdamW does not implement AMSGrad",
    "capturable": "a LIFT step decides on the host which weights select, so it cannot be captured in a CUDA graph",
    "differentiable": "LIFTAdamW's step is not differentiable (its kernels update in place under no_grad)",
}


def _scalar(v) -> float | None:
    """v as a float if it is a real number or a one-element real tensor, else None."""
    if isinstance(v, torch.Tensor):
        return float(v) if v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool else None
    return real(v)


def check_hyperparameters(group: dict) -> None:
    # Comparisons are written so that NaN fails them (NaN < 0 and NaN >= 0 are both False).
    lr = group["lr"]
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError(f"lr must be a float or a one-element tensor, got shape {tuple(lr.shape)}")
    lr_value = float(lr) if isinstance(lr, torch.Tensor) else real(lr)
    if lr_value is None or not 0.0 <= lr_value < math.inf:
        raise ValueError(f"lr must be >= 0 and finite, got {lr!r}")
    for key in ("eps", "weight_decay"):
        v = real(group[key])
        if v is None or not 0.0 <= v < math.inf:
            raise ValueError(f"{key} must be >= 0 and finite, got {group[key]!r}")
    betas = group["betas"]
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
            or not all(_scalar(b) is not None and 0.0 <= _scalar(b) < 1.0 for b in betas)):
        raise ValueError(f"betas must be a pair (beta1, beta2) of floats or one-element tensors, each in "
                         f"[0, 1), got {betas!r}")
    for key, why in _OFF_ONLY.items():
        if group[key] is not False:
            raise ValueError(f"{key}={group[key]!r}: {why}; leave {key} unset (False)")
    check_flag("maximize", group["maximize"])
    for key in ("foreach", "fused"):
        if group[key] not in (None, True, False):
            raise ValueError(f"{key} must be None, True or False (the implementation of the dense AdamW part, "
                             f"as in torch.optim.AdamW), got {group[key]!r}")
    if group["foreach"] and group["fused"]:
        raise ValueError("foreach=True and fused=True cannot be set together (as in torch.optim.AdamW); pick one")
    check_selection(group)
    if group["master_weights"] not in (None, True, False):
        raise ValueError(f"master_weights must be True, False or None (on for bf16/fp16 weights), "
                         f"got {group['master_weights']!r}")
    check_moment_bits(group["moment_bits"])
    if group["lift"] not in (None, True, False):
        raise ValueError(f"lift must be True, False or None (2-D tensors), got {group['lift']!r}")


def check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_seed(seed) -> int:
    if not is_int(seed):
        raise ValueError(f"seed must be an integer (it makes selections reproducible and resume-safe), "
                         f"got {seed!r}")
    return seed


def check_lift_param(p: torch.Tensor, name: str, group: dict, sparse_grad: bool = False) -> None:
    if is_quant(p):
        check_quant_param(p, name, group, needs_grad(group))
        check_selection(group, matrix_shape(p), name)
        return
    if p.dim() != 2:
        raise ValueError(
            f"LIFT weights must be 2-D matrices, but {name} has shape {tuple(p.shape)}; put it in a "
            "group with lift=False (dense AdamW) or leave lift unset so only 2-D tensors use LIFT")
    if not p.is_floating_point():
        raise ValueError(f"LIFT weight {name} has dtype {p.dtype}; LIFTAdamW trains floating-point "
                         "weights only (freeze it or leave it out of the optimizer)")
    if p.dtype not in LIFT_DTYPES:
        raise ValueError(f"LIFT weight {name} has dtype {p.dtype}; LIFT's kernels train fp32, bf16 and fp16 "
                         "weights: convert it (e.g. model.float()), or put it in a group with lift=False "
                         "(dense AdamW trains any floating-point dtype)")
    if p.is_meta:
        raise ValueError(f"LIFT weight {name} is on the meta device (no values to select from); "
                         "materialize the model (to_empty() and load its weights) before building the optimizer")
    if sparse_grad and not p.requires_grad:
        raise ValueError(f"LIFT weight {name} is frozen (requires_grad=False), so sparse_grad=True cannot "
                         "gather its gradient; unfreeze it or leave it out of the optimizer "
                         "(lk.lift_param_groups(model) takes only trainable weights)")
    if not p.is_contiguous():
        raise ValueError(f"LIFT weight {name} must be contiguous (flat indices address its storage); "
                         "call .data = .data.contiguous() on it before building the optimizer")
    if p.numel() >= 2**31:
        raise ValueError(f"LIFT weight {name} has {p.numel()} entries; int32 indices allow < 2**31")
    check_selection(group, tuple(p.shape), name)


def check_step_dtypes(params: list, name_of: Callable) -> None:
    """A weight converted after the optimizer was built (model.double()) is refused before its step
    changes any state."""
    bad = [f"{name_of(p)} ({p.dtype})" for p in params if p.dtype not in LIFT_DTYPES]
    if bad:
        raise ValueError(f"LIFT weight(s) {bad} are no longer fp32, bf16 or fp16, which LIFT's kernels train; "
                         "convert them back (e.g. model.float()) before step(); nothing was changed")


def check_unchanged_shape(p: torch.Tensor, state: dict, name_of: Callable) -> None:
    """A weight resized after the optimizer started (p.data = ...) would keep training stale entries."""
    shape, now = state.get("shape"), matrix_shape(p)  # a quantized layer's delta: the layer's (m, n)
    if shape is not None and now != tuple(shape):
        raise ValueError(f"LIFT weight {name_of(p)} changed shape from {tuple(shape)} to {now} "
                         "after LIFTAdamW started training it; build a new optimizer for the new weights")


def check_finite_weights(params: list, name_of: Callable, local_tensor: Callable) -> None:
    """Selection (an SVD) of a weight with NaN or inf fails deep inside linalg; name the weight.
    ``local_tensor`` gives the part of a weight this process holds."""
    if not params:
        return
    from torch._subclasses.fake_tensor import is_fake

    if any(is_fake(local_tensor(p)) for p in params):
        return  # under FakeTensorMode (memory simulation) values are unknown: nothing to check
    device = local_tensor(params[0]).device
    flags = torch.stack([torch.isfinite(local_tensor(p)).all().to(device) for p in params]).cpu()
    if not bool(flags.all()):
        bad = [name_of(p) for p, ok in zip(params, flags.tolist()) if not ok]
        raise ValueError(f"LIFT weight(s) {bad} contain NaN or inf at a selection step; the run diverged "
                         "before this step (lower lr, clip gradients, or use skip_nonfinite=True) or the "
                         "weights were loaded damaged")

