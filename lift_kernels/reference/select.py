"""The reference of principal_weights, and the top-k of scores that every selector ends with.

The ablation selectors (magnitude, random, gradient, movement) live in lift_kernels.optim.selection."""
from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .lowrank import exact_lowrank, fast_lowrank, work_dtype

SVD_MODES = ("exact", "fast")


def topk_flat_indices(scores: Tensor, k: int, largest: bool = True) -> Tensor:
    """Sorted int32 flat indices of the k largest (or smallest) entries of each matrix in ``scores``.

    ``scores`` is (m, n) or (b, m, n); the result is (k,) or (b, k). Ties at the threshold go to the
    lowest flat index, so the result is deterministic and has exactly k entries.
    """
    batched = scores.dim() == 3
    flat = scores.reshape(scores.shape[0] if batched else 1, -1)
    out = torch.empty(flat.shape[0], k, dtype=torch.int32, device=scores.device)
    if is_fake(scores):
        # Under FakeTensorMode only the result's shape is known; which entries win is data-dependent
        # (nonzero below has no fake output shape). Like the native op's registered fake, return
        # the uninitialised (b, k) int32 result. Real tensors never take this branch.
        return out if batched else out[0]
    for b in range(flat.shape[0]):
        s = flat[b] if largest else -flat[b]
        if k == 0:
            continue
        thr = torch.topk(s, k, sorted=False).values.min()
        above = torch.nonzero(s > thr).flatten()
        at = torch.nonzero(s == thr).flatten()[: k - above.numel()]
        out[b] = torch.sort(torch.cat([above, at])).values.to(torch.int32)
    return out if batched else out[0]


def full_rank(shape: tuple[int, ...], lra_rank: int) -> bool:
    """Whether the rank-``lra_rank`` approximation of matrices of ``shape`` (m, n) or (b, m, n) is the
    matrix itself: lra_rank >= min(m, n). Its principal weights are then the k largest |W| (a 2 x 128
    classifier head at lra_rank 64), selected so by every backend and selector path, with no random
    sketch drawn."""
    return lra_rank >= min(shape[-2:])


def principal_weights(
    W: Tensor,
    k: int,
    lra_rank: int,
    svd: str = "fast",
    largest: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sorted int32 flat indices of the k largest |W'| entries, W' the rank-``lra_rank`` approximation."""
    if svd not in SVD_MODES:
        raise ValueError(f"svd must be one of {SVD_MODES}, got {svd!r}")
    if full_rank(W.shape, lra_rank):
        return topk_flat_indices(W.abs().to(work_dtype(W)), k, largest)
    if svd == "exact":
        L, R = exact_lowrank(W, lra_rank)
    else:
        L, R = fast_lowrank(W, lra_rank, generator=generator)
    return topk_flat_indices((L @ R).abs_(), k, largest)
