"""The ops, dispatched to the backend chosen for the device of their tensors (see backend.py).

Every backend implements an op with the signature of its pure-torch reference in
lift_kernels.reference, which documents the semantics.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .backend import resolve


def sparse_adamw_step(params: list[Tensor], grads: list[Tensor], idxs: list[Tensor],
                      exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                      masters: list[Tensor | None] | None = None, *, step: int, lr: float,
                      beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    if not params:
        return
    resolve("sparse_adamw_step", params[0].device.type)(
        params, grads, idxs, exp_avgs, exp_avg_sqs, masters, step=step, lr=lr, beta1=beta1,
        beta2=beta2, eps=eps, weight_decay=weight_decay)


def remap_state(old_idx: Tensor, new_idx: Tensor, states: list[Tensor]) -> list[Tensor]:
    return resolve("remap_state", new_idx.device.type)(old_idx, new_idx, states)


def principal_weights(W: Tensor, k: int, lra_rank: int, svd: str = "fast", largest: bool = True,
                      generator: torch.Generator | None = None) -> Tensor:
    """Sorted int32 flat indices of the k largest |W'|, W' the best rank-``lra_rank`` approximation.

    ``W`` is (m, n) or a batch (b, m, n) of same-shaped matrices; the result is (k,) or (b, k).
    ``svd="exact"`` uses a full SVD; ``"fast"`` the accurate randomized path (seeded by
    ``generator``). ``largest=False`` selects the smallest entries instead.
    """
    _check_selection_args(W, k, lra_rank, svd)
    impl = resolve("principal_weights", W.device.type) if svd == "fast" else None
    if impl is None:  # exact mode is the reference by definition
        from .reference import principal_weights as impl
    return impl(W, k, lra_rank, svd, largest, generator)


def _check_selection_args(W: Tensor, k: int, lra_rank: int, svd: str) -> None:
    if W.dim() not in (2, 3):
        raise ValueError(f"W must be (m, n) or (b, m, n), got shape {tuple(W.shape)}")
    m, n = W.shape[-2:]
    if not 0 <= k <= m * n:
        raise ValueError(f"k must be in [0, m*n] = [0, {m * n}], got {k}")
    if not 1 <= lra_rank <= min(m, n):
        raise ValueError(f"lra_rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {lra_rank}")
    if svd not in ("exact", "fast"):
        raise ValueError(f"svd must be 'exact' or 'fast', got {svd!r}")
