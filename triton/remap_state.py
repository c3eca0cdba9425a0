"""Carry per-entry optimizer state across a re-selection (Triton), without any m*n temporary.

Each program takes BLOCK consecutive new indices. Because both index vectors are sorted, the old
indices that can match them form one contiguous run, found by two scalar binary searches; each
new index is then looked up by a vector binary search within that run, which is about BLOCK long
when the selection changes little and stays in L1. All states of a weight (up to MAX_STATES per
launch) are carried by the same launch, so the search is done once.
"""
from __future__ import annotations

import torch
from torch import Tensor

import triton
import triton.language as tl

# Entries and warps per program, from the sm_90 SASS (tests/test_sm90_sass.py holds it). The
# kernel is latency bound: ~log2(BLOCK) dependent loads per search, mostly L1 hits (the run of old
# indices a program searches is about BLOCK long), each followed by a compare and a select.
# 1024 / 8 warps (4 entries a thread): 32 registers -> 8 programs = 64 warps per SM (the most an
# SM holds), 8192 entries resident. 1024 / 4 warps: 48 registers -> 40 warps, 10240 entries, but
# each warp's 8-wide search steps stall it where 64 warps interleave. (Searching in int64 took
# 37-46 registers, and Triton 3.8's ptxas spilled one to fit 6 programs; positions are now int32
# and indices are compared in their own dtype.)
BLOCK = 1024
NUM_WARPS = 8
MAX_STATES = 4  # state slots per launch; m, v and a master copy need three


@triton.jit
def _search(sorted_ptr, lo, n, x, AFTER: tl.constexpr):
    """First position p in [lo, lo + n) with sorted[p] >= x (AFTER: sorted[p] > x), or lo + n; x a
    scalar or a tensor, compared in the indices' own dtype; positions are int32 (k < 2**31).

    Branch-free: the search length depends only on n, so every lane takes the same steps."""
    base = lo + (x * 0).to(tl.int32)
    length = n
    while length > 1:
        half = length // 2
        probe = tl.load(sorted_ptr + base + half)
        base = tl.where((probe <= x) if AFTER else (probe < x), base + half, base)
        length -= half
    # The mask takes base's shape before the load: Triton 3.9's interpreter rejects a scalar mask
    # on a vector load ("mask has unsupported dtype").
    nonempty = (base * 0 + length) > 0
    last = tl.load(sorted_ptr + base, mask=nonempty, other=0)
    before = (last <= x) if AFTER else (last < x)
    return tl.where(nonempty & before, base + 1, base)


@triton.jit
def _carry(src_ptr, dst_ptr, j, pos, hit, mask):
    tl.store(dst_ptr + j, tl.load(src_ptr + pos, mask=hit, other=0), mask=mask)


@triton.jit
def _remap_block(old_idx_ptr, new_idx_ptr, k_old, k_new, start, src0, dst0, src1, dst1, src2, dst2, src3, dst3,
                 NUM_STATES: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """New entries [start, start + BLOCK); MASKED only for the last, partial block (an all-true mask
    keeps the full blocks' new indices and written states contiguous, i.e. vector accesses)."""
    j = start + tl.arange(0, BLOCK)
    if MASKED:
        mask = j < k_new
        end = k_new
    else:
        mask = tl.full([BLOCK], 1, tl.int1)
        end = start + BLOCK
    x = tl.load(new_idx_ptr + j, mask=mask, other=0)
    lo = _search(old_idx_ptr, 0, k_old, tl.load(new_idx_ptr + start), AFTER=False)
    hi = _search(old_idx_ptr, lo, k_old - lo, tl.load(new_idx_ptr + end - 1), AFTER=True)
    pos = _search(old_idx_ptr, lo, hi - lo, x, AFTER=False)
    in_run = mask & (pos < hi)
    hit = in_run & (tl.load(old_idx_ptr + pos, mask=in_run, other=0) == x)
    _carry(src0, dst0, j, pos, hit, mask)
    if NUM_STATES > 1:
        _carry(src1, dst1, j, pos, hit, mask)
    if NUM_STATES > 2:
        _carry(src2, dst2, j, pos, hit, mask)
    if NUM_STATES > 3:
        _carry(src3, dst3, j, pos, hit, mask)


@triton.jit(do_not_specialize=["k_old", "k_new"])
def _remap_kernel(old_idx_ptr, new_idx_ptr, k_old, k_new, src0, dst0, src1, dst1, src2, dst2, src3, dst3,
                  NUM_STATES: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0) * BLOCK  # int32: k_new < 2**31
    if start + BLOCK <= k_new:
        _remap_block(old_idx_ptr, new_idx_ptr, k_old, k_new, start, src0, dst0, src1, dst1, src2, dst2, src3,
                     dst3, NUM_STATES=NUM_STATES, MASKED=False, BLOCK=BLOCK)
    else:
        _remap_block(old_idx_ptr, new_idx_ptr, k_old, k_new, start, src0, dst0, src1, dst1, src2, dst2, src3,
                     dst3, NUM_STATES=NUM_STATES, MASKED=True, BLOCK=BLOCK)


def remap_state(old_idx: Tensor, new_idx: Tensor, states: list[Tensor]) -> list[Tensor]:
    """The Triton kernel of the op lift_kernels::remap_state (lift_kernels/ops/library.py; semantics:
    lift_kernels.reference.remap_state)."""
    k_old, k_new = old_idx.numel(), new_idx.numel()
    for s in states:
        if s.numel() != k_old:
            raise ValueError(f"every state must have one value per old index ({k_old}), got {tuple(s.shape)}")
    if max(k_old, k_new) > 2**31 - 1 - BLOCK:
        raise ValueError(f"the Triton remap numbers entries in int32: k_old={k_old}, k_new={k_new} are too large")
    if k_old == 0 or k_new == 0:
        return [torch.zeros(k_new, dtype=s.dtype, device=s.device) for s in states]
    old_idx, new_idx = old_idx.contiguous(), new_idx.contiguous()
    states = [s.contiguous() for s in states]
    out = [torch.empty(k_new, dtype=s.dtype, device=s.device) for s in states]
    for first in range(0, len(states), MAX_STATES):
        src, dst = states[first:first + MAX_STATES], out[first:first + MAX_STATES]
        pairs = [t for pair in zip(src, dst) for t in pair]
        pairs += pairs[:2] * (MAX_STATES - len(src))  # unused slots: never touched
        _remap_kernel[(triton.cdiv(k_new, BLOCK),)](old_idx, new_idx, k_old, k_new, *pairs,
                                                     NUM_STATES=len(src), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out

