"""The sparse AdamW step: torch.optim.AdamW's update restricted to the selected entries (Eq. 3)."""
from __future__ import annotations

import math

import torch
from torch import Tensor


def sparse_adamw_step(
    params: list[Tensor],
    grads: list[Tensor],
    idxs: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    masters: list[Tensor | None] | None = None,
    *,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """Update, in place, the entries ``params[i].view(-1)[idxs[i]]`` and their moments.

    ``grads[i]`` is either the dense gradient (same shape as the weight) or the already gathered
    length-k gradient (sparse-gradient mode). ``masters[i]``, when given, is the fp32 copy of the
    selected entries of a half-precision weight: the update is applied to it and then rounded into
    the weight. The arithmetic follows torch.optim.AdamW's single-tensor path operation by
    operation, so fp32 results agree with it to rounding. ``step`` is the global step t after
    increment (bias correction uses it, not the age of an entry).
    """
    if masters is None:
        masters = [None] * len(params)
    consts = step_constants(step, lr, beta1, beta2, eps, weight_decay)
    for p, g, idx, m, v, master in zip(params, grads, idxs, exp_avgs, exp_avg_sqs, masters, strict=True):
        if idx.numel() == 0:
            continue
        adamw_selected(p, g, idx, m, v, master, consts)


def step_constants(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> dict:
    """The scalars of one step: the bias corrections use the global step t."""
    return {"step_size": lr / (1.0 - beta1**step), "bias_correction2_sqrt": math.sqrt(1.0 - beta2**step),
            "decay": 1.0 - lr * weight_decay, "beta1": beta1, "beta2": beta2, "eps": eps}


def adamw_selected(p: Tensor, g: Tensor, idx: Tensor, m: Tensor, v: Tensor, master: Tensor | None,
                   c: dict) -> None:
    """AdamW on one weight's selected entries: ``m`` and ``v`` (fp32, length k) and the weight (or its
    fp32 master) updated in place."""
    flat_idx = idx.long()
    flat_p = p.view(-1)
    g_sel = g.reshape(-1).index_select(0, flat_idx) if g.shape == p.shape else g
    g_sel = g_sel.float()
    w = master if master is not None else flat_p.index_select(0, flat_idx).float()
    w.mul_(c["decay"])
    m.lerp_(g_sel, 1.0 - c["beta1"])
    v.mul_(c["beta2"]).addcmul_(g_sel, g_sel, value=1.0 - c["beta2"])
    denom = (v.sqrt() / c["bias_correction2_sqrt"]).add_(c["eps"])
    w.addcdiv_(m, denom, value=-c["step_size"])
    flat_p.index_copy_(0, flat_idx, w.to(p.dtype))
