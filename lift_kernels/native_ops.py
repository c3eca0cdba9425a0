"""The ``cuda`` backend: Python signatures of the reference ops over torch.ops.lift_kernels.

The compiled extension lift_kernels._C registers the op schemas (csrc/ops.cpp) and its CPU and CUDA
kernels; this module adapts arguments. Fake implementations live in _fake_impls.py.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import unset_fake_temporarily


def sparse_adamw_step(params: list[Tensor], grads: list[Tensor], idxs: list[Tensor], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor], masters: list[Tensor | None] | None = None, *, step: int,
                      lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    # masters=None is the empty list of the schema: no weight has a master copy
    torch.ops.lift_kernels.sparse_adamw_step(params, grads, idxs, exp_avgs, exp_avg_sqs,
                                             [] if masters is None else masters, step, float(lr), beta1,
                                             beta2, eps, weight_decay)


def remap_state(old_idx: Tensor, new_idx: Tensor, states: list[Tensor]) -> list[Tensor]:
    return list(torch.ops.lift_kernels.remap_state(old_idx, new_idx, states))


def principal_weights(W: Tensor, k: int, lra_rank: int, svd: str = "fast", largest: bool = True,
                      generator: torch.Generator | None = None) -> Tensor:
    # The seed is a real number drawn from the real generator even under FakeTensorMode (where
    # .item() of a fake tensor is data-dependent and raises): outside fake mode the context manager
    # does nothing, so the draw, and the generator's state after it, are what they always were.
    with unset_fake_temporarily():
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    batch = W if W.dim() == 3 else W.unsqueeze(0)
    idx = torch.ops.lift_kernels.principal_weights(batch, k, lra_rank, largest, seed)
    return idx if W.dim() == 3 else idx[0]

