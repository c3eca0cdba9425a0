"""sampled_weight_grad (Triton): the weight gradient grad_out.T @ x at the entries idx only (SDDMM).

Each program takes BLOCK consecutive entries. It decodes each entry's row and column once, then
walks T in tiles of BLOCK_T: per tile it gathers grad_out[t, row] and x[t, col] for its entries as
(BLOCK_T, BLOCK) tiles, converts them to fp32 and adds their products into a (BLOCK_T, BLOCK) fp32
accumulator; the sum over its first axis at the end gives the BLOCK values. The entries run along
the threads of a warp: with LIFT's sorted indices the entries of a block share a row (one address
of grad_out per t, broadcast) and have increasing columns (nearby addresses of one row of x).
Any index order is correct, only less coalesced. fp64 inputs are rounded to fp32 as the reference
does.
"""
from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

from lift_kernels.ops.library import check_sampled_weight_grad_args, check_sampled_weight_grad_index

# Entries per program, rows of T per tile and warps, held to the sm_90 register budget in
# tests/test_sm90_sass.py: 4 warps spread the BLOCK entries over 128 threads, so each thread
# holds BLOCK * BLOCK_T / 128 accumulators and as many gathered pairs per tile. Triton 3.6 (the
# oldest supported) keeps a 64-bit address per tile element of each gathered operand, so the tile
# stays small: with 32 rows of T it needed three times the registers that 3.8 and 3.9 do.
BLOCK = 64
BLOCK_T = 8
NUM_WARPS = 4


@triton.jit
def _sampled_grad_kernel(g_ptr, x_ptr, idx_ptr, out_ptr, T, n, k, stride_gt, stride_gm, stride_xt, stride_xn,
                         BLOCK: tl.constexpr, BLOCK_T: tl.constexpr):
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # int32: k < 2**31
    mask = j < k
    flat = tl.load(idx_ptr + j, mask=mask, other=0)
    row = flat // n
    col = flat - row * n
    g_cols = g_ptr + row.to(tl.int64) * stride_gm
    x_cols = x_ptr + col.to(tl.int64) * stride_xn
    acc = tl.zeros([BLOCK_T, BLOCK], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tile_mask = (t < T)[:, None] & mask[None, :]
        t64 = t.to(tl.int64)[:, None]
        g = tl.load(g_cols[None, :] + t64 * stride_gt, mask=tile_mask, other=0.0).to(tl.float32)
        xv = tl.load(x_cols[None, :] + t64 * stride_xt, mask=tile_mask, other=0.0).to(tl.float32)
        acc += g * xv
    tl.store(out_ptr + j, tl.sum(acc, axis=0), mask=mask)


def sampled_weight_grad(grad_out: Tensor, x: Tensor, idx: Tensor) -> Tensor:
    """The Triton kernel of the op lift_kernels::sampled_weight_grad (lift_kernels/ops/library.py;
    semantics: lift_kernels.reference.sampled_weight_grad). Checks its arguments as the reference
    does, the index range included (reading idx: a host sync on an accelerator)."""
    check_sampled_weight_grad_args(grad_out, x, idx)
    check_sampled_weight_grad_index(grad_out, x, idx)
    T, n, k = grad_out.shape[0], x.shape[1], idx.numel()
    if k > 2**31 - 1 - BLOCK:
        raise ValueError(f"sampled_weight_grad: the Triton kernel numbers entries in int32, k={k} is too large")
    out = torch.zeros(k, dtype=torch.float32, device=grad_out.device)
    if k == 0 or T == 0:
        return out
    idx = idx.contiguous()
    _sampled_grad_kernel[(triton.cdiv(k, BLOCK),)](
        grad_out, x, idx, out, T, n, k, grad_out.stride(0), grad_out.stride(1), x.stride(0), x.stride(1),
        BLOCK=BLOCK, BLOCK_T=BLOCK_T, num_warps=NUM_WARPS)
    return out
