"""Rank-r approximations W ~= L @ R of a batch of matrices, returned as factors.

``exact_lowrank`` is Eckart-Young via a full SVD: the definition of LIFT's filter and the accuracy
reference. ``fast_lowrank`` is the accurate fast path, randomized block Krylov (block Lanczos with
full reorthogonalisation and a Rayleigh-Ritz step), the algorithm the C++/CUDA op runs too
(csrc/lowrank.cpp, the same ATen calls in the same order). All math is fp32 (fp64 input stays fp64).

Why block Krylov: LLM weight spectra are flat around the filter rank (sigma_r - sigma_{r+1} is about
4e-4 sigma_1 on SmolLM2-135M), so a power-iteration sketch needs many passes over W before the top-5%
entries of W' come out right. Agreement with the exact-SVD selection (|selected & exact| / k, density
5%) on the 210 projection matrices of SmolLM2-135M (30 layers; worst / mean over the layers;
tests/test_principal_weights_accuracy.py and bench/bench_principal_weights.py measure it):

    lra_rank 32                  q          k          v          o          gate       up         down
    this default (12 passes)     .9999/1    1/1 *      1/1 *      .9999/1    .9983/.9997 .9966/.9986 .9985/.9993
    svd_lowrank q=2r, niter=2    .681/.830  .730/.869  .490/.671  .559/.687  .474/.624  .311/.399  .389/.511
    svd_lowrank q=2r, niter=8    .949/.989  .980/.995  .837/.955  .892/.963  .841/.933  .724/.809  .804/.883
    lra_rank 64
    this default (12 passes)     1/1 *      1/1 *      1/1 *      1/1 *      1/1 *      1/1 *      1/1 *
    svd_lowrank q=2r, niter=2    .822/.922  .953/.985  .753/.917  .769/.862  .587/.709  .490/.572  .565/.647
    svd_lowrank q=2r, niter=8    .996/.999  1/1        .992/.999  .992/.997  .911/.970  .868/.939  .869/.955

    * exact SVD: the Krylov space this default asks for (6 (r + 48) columns) is as wide as the matrix
      (min(m, n) is 192 or 576 in SmolLM2), and then the SVD is the same work.

Tuning (lra_rank 32, worst over gate/up/down, against fp64 exact SVD): subspace iteration with q = r+16
and 16 iterations (34 passes) 0.84, q = 3r and 8 iterations 0.92; block Krylov with block b and depth t
(2t + 2 passes): b = r, t = 8: 0.985; b = r, t = 10: 0.999; b = r+32, t = 6: 0.997; b = r+64, t = 4
(10 passes): 0.992; b = r+48, t = 5 (12 passes, the default): 0.996. Forced below full width at
lra_rank 64 (10 passes, 560 of 576 columns) block Krylov still reaches 0.996. Products with W may run
in TF32 on a GPU: emulating TF32 rounding of both operands moved the worst agreement by < 0.001
(bf16 rounding of both cost 0.015: half-precision weights multiply a basis split into two bf16 parts).
"""
from __future__ import annotations

import torch
from torch import Tensor

# Products with W or W^T (each one pass over W's memory): the Krylov basis has PASSES / 2 blocks of
# lra_rank + OVERSAMPLE columns. The fewest passes that keep the worst SmolLM2 agreement >= 0.99 with
# a margin (see the tuning notes above): 10 passes left 0.992, 12 leave 0.996. csrc/lowrank.h
# repeats these two numbers; a test checks that they agree.
DEFAULT_PASSES = 12
DEFAULT_OVERSAMPLE = 48


def work_dtype(W: Tensor) -> torch.dtype:
    return torch.float64 if W.dtype == torch.float64 else torch.float32


def exact_lowrank(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-``rank`` factors of ``W`` (m, n) or (b, m, n) by full SVD: L (.., m, r), R (.., r, n)."""
    A = W.to(work_dtype(W))
    U, S, Vh = torch.linalg.svd(A, full_matrices=False)
    return U[..., :rank] * S[..., None, :rank], Vh[..., :rank, :]


def krylov_width(rank: int, passes: int, oversample: int) -> int:
    """Columns of the Krylov basis: (depth + 1) blocks of rank + oversample."""
    if passes < 2 or passes % 2:
        raise ValueError(f"passes must be an even number >= 2 (products with W and W^T), got {passes}")
    return (passes // 2) * (rank + oversample)


class WholeDim:
    """Sums and maxima over one dimension of W when the caller holds all of it: the identity.

    block_krylov takes one such object per dimension of W. A caller that holds only a block of a
    dimension passes one whose sum and max also combine the other blocks' partial results, and runs
    this very algorithm on its block.
    """

    @staticmethod
    def sum(t: Tensor) -> Tensor:
        return t

    @staticmethod
    def max(t: Tensor) -> Tensor:
        return t


WHOLE = WholeDim()


def _unit_scaled(Y: Tensor, dim=WHOLE) -> Tensor:
    """Y divided by its largest |entry| per matrix: products and Gram matrices of weights of any scale
    then neither overflow nor underflow (A A^T Q scales as |A|^2), and no span or eigenvector changes."""
    amax = dim.max(Y.abs().amax(dim=(-2, -1), keepdim=True))
    return Y / amax.clamp_min(torch.finfo(Y.dtype).tiny)


def _cholqr_pass(Y: Tensor, K: Tensor | None, dim=WHOLE) -> Tensor:
    """One CholeskyQR pass of Y (.., d, b), first projected out of span(K) when K is given.

    The Gram matrix gets a shift of eps * trace: Cholesky then succeeds even when Y is numerically
    rank deficient (a Krylov block whose new directions are exhausted), the span is unchanged, and
    the second pass restores orthonormality to about eps * b.
    """
    if K is not None:
        Y = Y - K @ dim.sum(K.mT @ Y)
    Y = _unit_scaled(Y, dim)
    G = dim.sum(Y.mT @ Y)
    eps = torch.finfo(Y.dtype).eps
    shift = eps * G.diagonal(dim1=-2, dim2=-1).sum(-1) + torch.finfo(Y.dtype).tiny
    G = G + shift[..., None, None] * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device)
    C = torch.linalg.cholesky_ex(G).L
    return torch.linalg.solve_triangular(C.mT, Y, upper=True, left=False)


def _orthonormalize(Y: Tensor, K: Tensor | None = None, dim=WHOLE) -> Tensor:
    """CholeskyQR2 (block classical Gram-Schmidt twice when K is given): GEMMs and a small Cholesky."""
    return _cholqr_pass(_cholqr_pass(Y, K, dim), K, dim)


def block_krylov(A: Tensor, omega: Tensor, rank: int, width: int, rows=WHOLE, cols=WHOLE) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors (L, R) of A (.., d, D) from the block Krylov space of A A^T started at A Omega.

    Blocks Q_0 = orth(A Omega), Q_j = orth(A Z_{j-1} against Q_0..Q_{j-1}) with Z_j = A^T Q_j fill
    ``width`` columns of the basis K; the Z_j are kept, so B = K^T A = Z^T costs no extra pass. The
    top-``rank`` eigenvectors U of Z^T Z (Rayleigh-Ritz) give A_r = (K U)(Z U)^T. ``rows`` and
    ``cols`` take the sums and maxima over d and D (see WholeDim); A and Omega (.., D, b) are this
    process's blocks of them.
    """
    b = omega.shape[-1]
    K = A.new_empty(*A.shape[:-2], A.shape[-2], width)
    Z = A.new_empty(*A.shape[:-2], A.shape[-1], width)
    K[..., :b] = _orthonormalize(cols.sum(A @ omega), None, rows)
    Z[..., :b] = rows.sum(A.mT @ K[..., :b])
    for j in range(b, width, b):
        K[..., j:j + b] = _orthonormalize(cols.sum(A @ _unit_scaled(Z[..., j - b:j], cols)), K[..., :j], rows)
        Z[..., j:j + b] = rows.sum(A.mT @ K[..., j:j + b])
    Zs = _unit_scaled(Z, cols)
    U = torch.linalg.eigh(cols.sum(Zs.mT @ Zs)).eigenvectors[..., width - rank:]  # ascending: top last
    return K @ U, (Z @ U).mT


def fast_lowrank(
    W: Tensor,
    rank: int,
    *,
    passes: int = DEFAULT_PASSES,
    oversample: int = DEFAULT_OVERSAMPLE,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of ``W`` (m, n) or (b, m, n) by randomized block Krylov (block_krylov).

    The basis lives on the short side: A = W, or W^T when m > n. Omega (D x (rank + oversample),
    Gaussian) is drawn from ``generator`` on its device (the C++ op draws the same numbers from a CPU
    generator seeded the same way). When the Krylov space would be as wide as the matrix, the exact
    SVD is returned.
    """
    m, n = W.shape[-2:]
    s = krylov_width(rank, passes, oversample)
    if s >= min(m, n):
        return exact_lowrank(W, rank)
    A = W.to(work_dtype(W))
    if m > n:
        A = A.mT
    omega = sketch(A.shape[:-2], A.shape[-1], rank + oversample, A, generator)
    L, R = block_krylov(A, omega, rank, s)
    return (R.mT, L.mT) if m > n else (L, R)


def sketch(batch: torch.Size, rows: int, cols: int, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """Gaussian (.., rows, cols) in ``like``'s dtype on its device, drawn on ``generator``'s device."""
    device = generator.device if generator is not None else like.device
    return torch.randn(*batch, rows, cols, generator=generator, dtype=like.dtype, device=device).to(like.device)
