"""Rank-r factors of a row-sharded matrix: products with the local rows plus small all-reduces.

Both functions return this rank's rows of L (.., rows, r) and the whole R (.., r, n), so
W'_local = L_local @ R. They follow reference.lowrank step for step, so they agree with the
single-process factors up to floating-point rounding:

- ``sharded_fast_lowrank`` is reference.lowrank.fast_lowrank (same sketch Omega from the same
  generator, same passes and oversampling, read from that module) with the products split by rows:
  A @ X is row-local, A^T @ Q and Q^T @ A are sums over row blocks (an all-reduce of n x q), and
  orthonormalising the row-split m x q matrix is CholeskyQR2 on an all-reduced q x q Gram matrix
  (fp64, so its squared condition number is harmless) instead of Householder QR. The two QRs differ
  in column signs and rounding only; the projection Q Q^T A does not depend on the signs.
- ``sharded_exact_lowrank`` replaces the full SVD by the eigenvectors of the all-reduced n x n Gram
  matrix A^T A in fp64: W' = A V_r V_r^T is the Eckart-Young approximation.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import lowrank
from .placement import RowShard


def _cholesky_qr2(Y: Tensor, shard: RowShard) -> Tensor:
    """Orthonormal basis of the row-split columns of Y (this rank's rows of it), in Y's dtype."""
    Q = Y.double()
    for _ in range(2):
        G = shard.all_reduce(Q.mT @ Q)
        R, info = torch.linalg.cholesky_ex(G, upper=True)
        if bool((info > 0).any()):  # numerically rank-deficient sketch: shift it (shifted CholeskyQR)
            shift = 1e-13 * G.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-300)
            eye = torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
            R = torch.linalg.cholesky(G + shift[..., None, None] * eye, upper=True)
        Q = torch.linalg.solve_triangular(R, Q, upper=True, left=False)
    return Q.to(Y.dtype)


def sharded_exact_lowrank(A_local: Tensor, rank: int, shard: RowShard) -> tuple[Tensor, Tensor]:
    A = A_local.to(torch.float64)
    G = shard.all_reduce(A.mT @ A)  # n x n: the rows' contributions add up
    _, V = torch.linalg.eigh(G)  # ascending eigenvalues
    Vr = V[..., -rank:].flip(-1)
    work = lowrank._work_dtype(A_local)
    return (A @ Vr).to(work), Vr.mT.to(work)


def sharded_fast_lowrank(A_local: Tensor, rank: int, shard: RowShard,
                         generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    A = A_local.to(lowrank._work_dtype(A_local))
    m, n = shard.shape
    q = min(rank + lowrank.DEFAULT_OVERSAMPLE, m, n)
    if q == min(m, n):  # the reference falls back to the exact path here too
        return sharded_exact_lowrank(A_local, rank, shard)
    omega = torch.randn(*A.shape[:-2], n, q, generator=generator, dtype=A.dtype, device="cpu").to(A.device)
    Q = _cholesky_qr2(A @ omega, shard)
    At = A.mT
    for _ in range(lowrank.DEFAULT_PASSES):
        Z = lowrank._orthonormalize(shard.all_reduce(At @ Q))  # replicated n x q: same QR everywhere
        Q = _cholesky_qr2(A @ Z, shard)
    B = shard.all_reduce(Q.mT @ A)  # (.., q, n)
    Ub, S, Vh = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub[..., :rank]) * S[..., None, :rank], Vh[..., :rank, :]
