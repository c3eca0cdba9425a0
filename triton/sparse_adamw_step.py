"""Fused multi-tensor sparse AdamW step (Triton): all LIFT weights of a call in one launch.

Each program updates BLOCK consecutive selected entries of one weight. Which weight, and where its
tensors live, comes from a small int64 device table: per weight, element offsets of its weight,
grad, indices, moments and master from one base tensor of each kind (passed as typed pointer
arguments), plus k. Offsets rather than raw addresses let the compiler know the alignment of the
length-k streams and vectorize them; raw addresses cast with ``.to(tl.pointer_type(...))`` also
work, in the interpreter too, but their alignment is unknown. The table depends only on addresses and
sizes, so it is cached and repeated steps over the same tensors reuse it: no host-to-device copy.

Hyperparameters reach the kernel as fp32 runtime scalars computed on the host in double precision,
as torch.optim.AdamW computes them, so a new lr or step never recompiles and never syncs.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor

import triton
import triton.language as tl

# Entries and warps per program, chosen from the sm_90 SASS (tests/test_sm90_sass.py holds it;
# an SM has 65536 registers, allocated per warp in units of 256, and at most 64 warps). The step is
# latency bound: a program loads its table row, then idx and the other length-k streams, then the
# weight (and dense grad) at idx, so what an SM has resident is what it has in flight.
#   1024 entries / 8 warps: 4 entries a thread, 48 registers -> 5 programs = 40 warps = 5120
#     entries per SM; every fp32/int32 stream one 128-bit access per thread.
#   1024 / 4 (8 a thread): 74-80 registers -> 6 programs = 24 warps = 6144 entries; capped at 64
#     registers (32 warps) it spills 4-39 registers.  2048 / 4: 131-161 registers, 12 warps.
# 1024 / 8 keeps within 17% of the most entries in flight with 1.7x the warps to issue the exact
# sqrt and division of each entry (a bench/bench_sparse_adamw_step.py sweep on the GPU decides).
# The weight's scatter store has its own one-entry-a-thread layout, reached through shared memory
# (the 9216 bytes per program); every other stream stays in the 4-entries-a-thread layout.
BLOCK = 1024
NUM_WARPS = 8

# One row of the table per weight: element offsets of (weight, grad, idx, exp_avg, exp_avg_sq,
# master) from their base tensors, then k and the weight's first block.
ROW = 8

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TABLE_CACHE_SIZE = 64


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``dtype``, as torch rounds. bf16 is rounded with
    integer ops: Triton 3.6's interpreter truncates fp32 -> bf16 casts (and its "rtne" mode rounds
    half up without carrying), so a plain cast would be tested with other rounding than the GPU's."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _adamw(w, m, v, g, decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, step_size, eps):
    """(weight, exp_avg, exp_avg_sq) after one step, fp32. torch.optim.AdamW's single-tensor
    arithmetic, operation by operation, in fp32 with IEEE rounding (the kernels are memory bound, so
    exact sqrt and division cost nothing). Shared with sparse_adamw8bit_step.py."""
    w = w * decay
    # torch.lerp switches formula at weight 0.5 so that it is exact at both ends; follow it
    m = tl.where(one_minus_beta1 < 0.5, m + one_minus_beta1 * (g - m), g - (g - m) * (1.0 - one_minus_beta1))
    v = v * beta2 + one_minus_beta2 * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    w = w + (-step_size) * tl.div_rn(m, denom)
    return w, m, v


@triton.jit
def _update_entries(param_ptr, grad_ptr, idx_ptr, exp_avg_ptr, exp_avg_sq_ptr, master_ptr, j, k,
                    decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, step_size, eps,
                    GATHERED_GRAD: tl.constexpr, MASTER: tl.constexpr, MASKED: tl.constexpr,
                    BLOCK: tl.constexpr):
    """AdamW on entries j of one weight; MASKED only for its last, partial block (an all-true mask
    keeps the full blocks' contiguous streams vectorizable)."""
    if MASKED:
        mask = j < k
    else:
        mask = tl.full([BLOCK], 1, tl.int1)
    # Indices, moments and gathered grads are touched once: let them leave the cache first. The
    # weight's sectors are read and then written, so they keep the default policy.
    idx = tl.load(idx_ptr + j, mask=mask, other=0, eviction_policy="evict_first")
    if GATHERED_GRAD:  # the length-k gradient: a contiguous stream like the moments
        g = tl.load(grad_ptr + j, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    else:  # the dense gradient, gathered at the selected entries
        g = tl.load(grad_ptr + idx, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    m = tl.load(exp_avg_ptr + j, mask=mask, other=0.0, eviction_policy="evict_first")
    v = tl.load(exp_avg_sq_ptr + j, mask=mask, other=0.0, eviction_policy="evict_first")
    if MASTER:
        w = tl.load(master_ptr + j, mask=mask, other=0.0)
    else:
        w = tl.load(param_ptr + idx, mask=mask, other=0.0).to(tl.float32)

    w, m, v = _adamw(w, m, v, g, decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt,
                     step_size, eps)

    tl.store(exp_avg_ptr + j, m, mask=mask)
    tl.store(exp_avg_sq_ptr + j, v, mask=mask)
    if MASTER:
        tl.store(master_ptr + j, w, mask=mask)
    tl.store(param_ptr + idx, _round_to(w, param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sparse_adamw_kernel(table_ptr, param_base, grad_base, idx_base, state_base,
                         decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, step_size, eps,
                         GATHERED_GRAD: tl.constexpr, MASTER: tl.constexpr, ALIGNED: tl.constexpr,
                         BLOCK: tl.constexpr):
    """One program: BLOCK consecutive entries of one weight. GATHERED_GRAD (grads are length k) and
    MASTER (fp32 master copies) are compile-time: one launch holds weights that agree on both, as
    the optimizer's buckets do, and each of the four kernels loads only the streams it uses."""
    pid = tl.program_id(0)
    # table = [row offset of each block's weight] ++ [one row of ROW fields per weight]
    row = table_ptr + tl.load(table_ptr + pid)
    grad_off = tl.load(row + 1)
    idx_off = tl.load(row + 2)
    exp_avg_off = tl.load(row + 3)
    exp_avg_sq_off = tl.load(row + 4)
    master_off = tl.load(row + 5)
    if ALIGNED:
        # The host checked that every length-k stream starts a multiple of 4 entries after its
        # base: each thread then moves 4 consecutive entries of each stream in one access, 128 bits
        # for the fp32/int32 ones, 64 for a bf16/fp16 gathered grad. (Claiming 8 entries for the
        # latter gets it one 128-bit load but in another register layout than the fp32 streams,
        # converted through shared memory: +16 STS.64/LDS.64 per thread in the SASS.)
        idx_off = tl.multiple_of(idx_off, 4)
        exp_avg_off = tl.multiple_of(exp_avg_off, 4)
        exp_avg_sq_off = tl.multiple_of(exp_avg_sq_off, 4)
        master_off = tl.multiple_of(master_off, 4)
        if GATHERED_GRAD:
            grad_off = tl.multiple_of(grad_off, 4)
    k = tl.load(row + 6).to(tl.int32)  # k < 2**31: indices are int32
    block = pid - tl.load(row + 7).to(tl.int32)
    # int32 entry numbers within the weight (the 64-bit offsets above are added once per stream)
    j = block * BLOCK + tl.arange(0, BLOCK)
    param_ptr = param_base + tl.load(row + 0)
    grad_ptr = grad_base + grad_off
    if (block + 1) * BLOCK <= k:
        _update_entries(param_ptr, grad_ptr, idx_base + idx_off, state_base + exp_avg_off,
                        state_base + exp_avg_sq_off, state_base + master_off, j, k, decay,
                        one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, step_size, eps,
                        GATHERED_GRAD=GATHERED_GRAD, MASTER=MASTER, MASKED=False, BLOCK=BLOCK)
    else:
        _update_entries(param_ptr, grad_ptr, idx_base + idx_off, state_base + exp_avg_off,
                        state_base + exp_avg_sq_off, state_base + master_off, j, k, decay,
                        one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, step_size, eps,
                        GATHERED_GRAD=GATHERED_GRAD, MASTER=MASTER, MASKED=True, BLOCK=BLOCK)


# ------------------------------------------------------------------------------------ the table
_tables: OrderedDict[tuple, tuple[Tensor, int, bool]] = OrderedDict()


def _offsets(addresses: list[int], elem_size: int) -> list[int]:
    """Element offsets of ``addresses`` from the first one (every tensor is element aligned)."""
    base = addresses[0]
    if any((a - base) % elem_size for a in addresses):
        raise ValueError("tensors of one kind must be aligned to their element size")
    return [(a - base) // elem_size for a in addresses]


def _pointer_table(weights: list[tuple[Tensor, ...]], device: torch.device,
                   gathered_grad: bool) -> tuple[Tensor, int, bool]:
    """(device table, number of blocks, whether the length-k streams are 16-byte aligned) for
    weights given as (param, grad, idx, exp_avg, exp_avg_sq, master-or-None); cached by
    addresses, sizes and BLOCK, since the table is a function of them alone."""
    key = (device, BLOCK, tuple((p.data_ptr(), g.data_ptr(), i.data_ptr(), m.data_ptr(), v.data_ptr(),
                          0 if ms is None else ms.data_ptr(), i.numel(), g.numel())
                         for p, g, i, m, v, ms in weights))
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    params, grads, idxs, exp_avgs, exp_avg_sqs, masters = zip(*weights)
    states = [t.data_ptr() for t in exp_avgs + exp_avg_sqs + tuple(ms for ms in masters if ms is not None)]
    state_off = _offsets(states, 4)
    exp_avg_off, exp_avg_sq_off = state_off[:len(weights)], state_off[len(weights):2 * len(weights)]
    master_iter = iter(state_off[2 * len(weights):])
    master_off = [0 if ms is None else next(master_iter) for ms in masters]
    idx_off = _offsets([i.data_ptr() for i in idxs], 4)
    param_off = _offsets([p.data_ptr() for p in params], params[0].element_size())
    grad_off = _offsets([g.data_ptr() for g in grads], grads[0].element_size())
    # whether every length-k stream (a gathered grad is one) starts a multiple of 4 entries after
    # its base tensor
    aligned = all(o % 4 == 0 for o in state_off + idx_off + (grad_off if gathered_grad else []))

    blocks = [triton.cdiv(i.numel(), BLOCK) for i in idxs]
    n_blocks = sum(blocks)
    block_rows, rows, first_block = [], [], 0
    for w, nb in enumerate(blocks):
        block_rows += [n_blocks + ROW * w] * nb
        rows += [param_off[w], grad_off[w], idx_off[w], exp_avg_off[w], exp_avg_sq_off[w], master_off[w],
                 idxs[w].numel(), first_block]
        first_block += nb
    host = torch.tensor(block_rows + rows, dtype=torch.int64)
    if device.type != "cpu":
        # From pinned memory the copy is asynchronous: no host sync even when the table is new.
        host = host.pin_memory()
    hit = _tables[key] = (host.to(device, non_blocking=True), n_blocks, aligned)
    if len(_tables) > _TABLE_CACHE_SIZE:
        _tables.popitem(last=False)
    return hit


# ------------------------------------------------------------------------------------ the op
def hyper_scalars(step: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> tuple:
    """The scalar arguments of ``_adamw`` after its tensors: what torch.optim.AdamW derives from the
    hyperparameters, in double precision."""
    return (1.0 - lr * weight_decay, 1.0 - beta1, beta2, 1.0 - beta2,
            math.sqrt(1.0 - beta2**step), lr / (1.0 - beta1**step), eps)


def _check(p: Tensor, g: Tensor, idx: Tensor, m: Tensor, v: Tensor, master: Tensor | None) -> None:
    if p.dtype not in _WEIGHT_DTYPES or g.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"weights and grads must be fp32, bf16 or fp16, got {p.dtype} and {g.dtype}")
    if not p.is_contiguous():
        raise ValueError("the Triton sparse AdamW step updates weights in place and needs them contiguous")
    k = idx.numel()
    if k > 2**31 - 1 - BLOCK:
        raise ValueError(f"the Triton sparse AdamW step numbers entries in int32: k={k} is too large")
    for name, t in (("exp_avg", m), ("exp_avg_sq", v), ("master", master)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != k or not t.is_contiguous()):
            raise ValueError(f"{name} must be a contiguous fp32 vector of length k={k}, "
                             f"got {t.dtype} of shape {tuple(t.shape)}")
    if g.shape != p.shape and g.numel() != k:
        raise ValueError(f"grad must have the weight's shape {tuple(p.shape)} or length k={k}, "
                         f"got shape {tuple(g.shape)}")


def sparse_adamw_step(params: list[Tensor], grads: list[Tensor], idxs: list[Tensor], exp_avgs: list[Tensor],
                      exp_avg_sqs: list[Tensor], masters: list[Tensor | None] | None = None, *, step: int,
                      lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """The Triton kernel of the op lift_kernels::sparse_adamw_step (lift_kernels/ops/library.py;
    semantics: lift_kernels.reference.sparse_adamw_step). Moments and masters must be fp32.

    Weights that agree on weight dtype, grad dtype, gathered or dense grad and master or none
    share a launch of the kernel specialized for that; the optimizer's buckets agree on all four,
    so a step of a bucket is one launch."""
    if masters is None:
        masters = [None] * len(params)
    groups: dict[tuple, list[tuple]] = {}
    for p, g, idx, m, v, master in zip(params, grads, idxs, exp_avgs, exp_avg_sqs, masters, strict=True):
        _check(p, g, idx, m, v, master)
        if idx.numel() == 0:
            continue
        # Copies made here are freed after the launch is queued; the caching allocator orders their
        # reuse after it on the stream.
        g = g.contiguous()
        idx = idx.to(torch.int32).contiguous()
        key = (p.device, p.dtype, g.dtype, g.shape != p.shape, master is not None)
        groups.setdefault(key, []).append((p, g, idx, m, v, master))
    scalars = hyper_scalars(step, lr, beta1, beta2, eps, weight_decay)
    for (device, _, _, gathered_grad, master), weights in groups.items():
        table, n_blocks, aligned = _pointer_table(weights, device, gathered_grad)
        p, g, idx, m = weights[0][:4]
        _sparse_adamw_kernel[(n_blocks,)](table, p, g, idx, m, *scalars, GATHERED_GRAD=gathered_grad,
                                          MASTER=master, ALIGNED=aligned, BLOCK=BLOCK, num_warps=NUM_WARPS)

