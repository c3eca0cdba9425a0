"""Rank-r factors of a row-sharded matrix: products with the local rows plus small all-reduces.

Both functions return this rank's rows of L (.., rows, r) and the whole R (.., r, n), so
W'_local = L_local @ R. They follow reference.lowrank step for step, so they agree with the
single-process factors up to floating-point rounding:

- ``sharded_fast_lowrank`` runs reference.lowrank.block_krylov itself, as fast_lowrank does (same
  sketch Omega from the same generator, same passes and oversampling, same orientation), with the
  sums and maxima over W's rows all-reduced: products over the split dimension, the CholeskyQR
  Gram matrices and projections of a row-split basis, and the Rayleigh-Ritz Gram matrix.
- ``sharded_exact_lowrank`` replaces the full SVD by the eigenvectors of the all-reduced n x n Gram
  matrix A^T A in fp64: W' = A V_r V_r^T is the Eckart-Young approximation.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..reference import lowrank
from .placement import RowShard


class _SplitDim:
    """Sums and maxima over W's rows, which the ranks of ``shard`` split between them."""

    def __init__(self, shard: RowShard):
        self.shard = shard

    def sum(self, t: Tensor) -> Tensor:
        return self.shard.all_reduce(t)

    def max(self, t: Tensor) -> Tensor:
        return self.shard.all_reduce(t, op=dist.ReduceOp.MAX)


def sharded_exact_lowrank(A_local: Tensor, rank: int, shard: RowShard) -> tuple[Tensor, Tensor]:
    A = A_local.to(torch.float64)
    G = shard.all_reduce(A.mT @ A)  # n x n: the rows' contributions add up
    _, V = torch.linalg.eigh(G)  # ascending eigenvalues
    Vr = V[..., -rank:].flip(-1)
    work = lowrank.work_dtype(A_local)
    return (A @ Vr).to(work), Vr.mT.to(work)


def sharded_fast_lowrank(A_local: Tensor, rank: int, shard: RowShard,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    m, n = shard.shape
    width = lowrank.krylov_width(rank, lowrank.DEFAULT_PASSES, lowrank.DEFAULT_OVERSAMPLE)
    if width >= min(m, n):  # the reference falls back to the exact path here too
        return sharded_exact_lowrank(A_local, rank, shard)
    A = A_local.to(lowrank.work_dtype(A_local))
    b, split = rank + lowrank.DEFAULT_OVERSAMPLE, _SplitDim(shard)
    if m > n:  # basis on the n side (replicated); W^T's columns are this rank's rows
        omega = lowrank.sketch(A.shape[:-2], m, b, A, generator)
        omega = omega[..., shard.row_offset:shard.row_offset + shard.rows, :]
        L, R = lowrank.block_krylov(A.mT, omega, rank, width, rows=lowrank.WHOLE, cols=split)
        return R.mT, L.mT
    omega = lowrank.sketch(A.shape[:-2], n, b, A, generator)
    return lowrank.block_krylov(A, omega, rank, width, rows=split, cols=lowrank.WHOLE)
