"""Fused multi-tensor sparse AdamW step with 8-bit moments (Triton): all weights of a call in one launch.

One program per block of QBLOCK (256) selected entries of one weight, the unit that owns one scale per
moment (lift_kernels/reference/moment_codes.py): it reads both moments back (a gather from each
book), runs the fp32 AdamW arithmetic of sparse_adamw_step.py (``_adamw``, the same code), stores the
weight (or master), then each moment's new scale (tl.max of |value| over the block) and codes:
r = value / scale as an IEEE division (tl.div_rn, so a GPU divides as the CPU does), clamped, and
code = the number of midpoints below r by an 8-step binary search, one gather a step.

As in sparse_adamw_step.py, a small int64 table holds per weight the element offsets of its tensors
from one base tensor of each kind, cached by addresses and sizes; the midpoints are computed once per
book (by torch, in fp32, as the reference computes them) and cached by the book's address and version.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor

import triton
import triton.language as tl

from lift_kernels._triton_loader import load_kernel_module
from lift_kernels.reference.moment_codes import QBLOCK, midpoints

_step = load_kernel_module("sparse_adamw_step")
_adamw = _step._adamw
_round_to = _step._round_to
_offsets = _step._offsets

# A program is one block of moment codes (one scale per moment); 2 warps give 4 entries a thread, the
# layout of sparse_adamw_step's streams.
BLOCK = QBLOCK
NUM_WARPS = 2
# per weight: offsets of weight, grad, idx, exp_avg codes, exp_avg scales, exp_avg_sq codes,
# exp_avg_sq scales, master; then k and the weight's first block
ROW = 10
_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CACHE_SIZE = 64


@triton.jit
def _quantize(x, mask, book_mid_ptr, code_ptr, scale_ptr):
    """Stores the block's scale (largest |x|) and codes (number of midpoints below x / scale)."""
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=0)
    tl.store(scale_ptr, amax)
    r = tl.div_rn(x, tl.where(amax > 0.0, amax, 1.0))
    r = tl.minimum(tl.maximum(r, -1.0), 1.0)
    code = tl.zeros_like(r).to(tl.int32)
    for s in tl.static_range(8):  # branch-free lower bound over the 255 sorted midpoints
        cand = code + (128 >> s)
        below = tl.load(book_mid_ptr + cand - 1) < r
        code = tl.where(below, cand, code)
    tl.store(code_ptr, code.to(tl.uint8), mask=mask)


@triton.jit
def _sparse_adamw8bit_kernel(table_ptr, param_base, grad_base, idx_base, code_base, f32_base,
                             m_book_ptr, m_mid_ptr, v_book_ptr, v_mid_ptr,
                             decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt, step_size, eps,
                             GATHERED_GRAD: tl.constexpr, MASTER: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    row = table_ptr + tl.load(table_ptr + pid)
    k = tl.load(row + 8).to(tl.int32)
    block = pid - tl.load(row + 9).to(tl.int32)
    j = block * BLOCK + tl.arange(0, BLOCK)
    mask = j < k
    param_ptr = param_base + tl.load(row + 0)
    grad_ptr = grad_base + tl.load(row + 1)
    m_codes = code_base + tl.load(row + 3) + j
    v_codes = code_base + tl.load(row + 5) + j
    m_scale = f32_base + tl.load(row + 4) + block
    v_scale = f32_base + tl.load(row + 6) + block
    master_ptr = f32_base + tl.load(row + 7) + j

    idx = tl.load(idx_base + tl.load(row + 2) + j, mask=mask, other=0, eviction_policy="evict_first")
    if GATHERED_GRAD:
        g = tl.load(grad_ptr + j, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    else:
        g = tl.load(grad_ptr + idx, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    mc = tl.load(m_codes, mask=mask, other=0).to(tl.int32)
    vc = tl.load(v_codes, mask=mask, other=0).to(tl.int32)
    m = tl.load(m_book_ptr + mc) * tl.load(m_scale)
    v = tl.load(v_book_ptr + vc) * tl.load(v_scale)
    if MASTER:
        w = tl.load(master_ptr, mask=mask, other=0.0)
    else:
        w = tl.load(param_ptr + idx, mask=mask, other=0.0).to(tl.float32)

    w, m, v = _adamw(w, m, v, g, decay, one_minus_beta1, beta2, one_minus_beta2, bias_correction2_sqrt,
                     step_size, eps)

    if MASTER:
        tl.store(master_ptr, w, mask=mask)
    tl.store(param_ptr + idx, _round_to(w, param_ptr.dtype.element_ty), mask=mask)
    _quantize(m, mask, m_mid_ptr, m_codes, m_scale)
    _quantize(v, mask, v_mid_ptr, v_codes, v_scale)


# ------------------------------------------------------------------------------- tables, books
_tables: OrderedDict[tuple, tuple[Tensor, int]] = OrderedDict()
_mids: OrderedDict[tuple, Tensor] = OrderedDict()


def _remember(cache: OrderedDict, key, value):
    cache[key] = value
    if len(cache) > _CACHE_SIZE:
        cache.popitem(last=False)
    return value


def _pointer_table(weights: list[tuple], device: torch.device) -> tuple[Tensor, int]:
    """(device table, number of blocks) for weights given as (param, grad, idx, m codes, m scales,
    v codes, v scales, master-or-None); cached by addresses and sizes."""
    key = (device, tuple((*(0 if t is None else t.data_ptr() for t in w), w[2].numel(), w[1].numel())
                         for w in weights))
    hit = _tables.get(key)
    if hit is not None:
        _tables.move_to_end(key)
        return hit
    params, grads, idxs, mcs, mss, vcs, vss, masters = zip(*weights)
    n = len(weights)
    code_off = _offsets([t.data_ptr() for t in mcs + vcs], 1)
    f32 = [t.data_ptr() for t in mss + vss + tuple(ms for ms in masters if ms is not None)]
    f32_off = _offsets(f32, 4)
    master_iter = iter(f32_off[2 * n:])
    master_off = [0 if ms is None else next(master_iter) for ms in masters]
    param_off = _offsets([p.data_ptr() for p in params], params[0].element_size())
    grad_off = _offsets([g.data_ptr() for g in grads], grads[0].element_size())
    idx_off = _offsets([i.data_ptr() for i in idxs], 4)
    blocks = [triton.cdiv(i.numel(), QBLOCK) for i in idxs]
    n_blocks = sum(blocks)
    block_rows, rows, first = [], [], 0
    for w, nb in enumerate(blocks):
        block_rows += [n_blocks + ROW * w] * nb
        rows += [param_off[w], grad_off[w], idx_off[w], code_off[w], f32_off[w], code_off[n + w], f32_off[n + w],
                 master_off[w], idxs[w].numel(), first]
        first += nb
    host = torch.tensor(block_rows + rows, dtype=torch.int64)
    if device.type != "cpu":
        host = host.pin_memory()
    return _remember(_tables, key, (host.to(device, non_blocking=True), n_blocks))


def _midpoints(book: Tensor, name: str) -> Tensor:
    if book.dtype != torch.float32 or book.shape != (256,) or not book.is_contiguous():
        raise ValueError(f"{name} must be a contiguous fp32 tensor of shape (256,), got {book.dtype} of shape "
                         f"{tuple(book.shape)}")
    key = (book.device, book.data_ptr(), book._version)
    hit = _mids.get(key)
    if hit is not None:
        return hit
    if not bool((book.diff() > 0).all()):  # once per book: a sync only when it is new
        raise ValueError(f"{name} must be sorted in increasing order")
    return _remember(_mids, key, midpoints(book).contiguous())


# ------------------------------------------------------------------------------------ the op
def _check(i: int, p, g, idx, mc, ms, vc, vs, master) -> None:
    if p.dtype not in _WEIGHT_DTYPES or g.dtype not in _WEIGHT_DTYPES:
        raise TypeError(f"params[{i}] and grads[{i}] must be fp32, bf16 or fp16, got {p.dtype} and {g.dtype}")
    if not p.is_contiguous():
        raise ValueError(f"params[{i}] must be contiguous (its entries are updated in place at flat indices)")
    k = idx.numel()
    if k > 2**31 - 1 - QBLOCK:
        raise ValueError(f"idxs[{i}]: the Triton step numbers entries in int32, k={k} is too large")
    blocks = triton.cdiv(k, QBLOCK)
    for name, t, dtype, n in (("exp_avg_codes", mc, torch.uint8, k), ("exp_avg_sq_codes", vc, torch.uint8, k),
                              ("exp_avg_scales", ms, torch.float32, blocks),
                              ("exp_avg_sq_scales", vs, torch.float32, blocks), ("masters", master, torch.float32, k)):
        if t is not None and (t.dtype != dtype or t.dim() != 1 or t.numel() != n or not t.is_contiguous()):
            raise ValueError(f"{name}[{i}] must be a contiguous {dtype} vector of length {n}, got {t.dtype} of "
                             f"shape {tuple(t.shape)}")
        if t is not None and t.device != p.device:
            raise ValueError(f"{name}[{i}] must be on params[{i}]'s device {p.device}, got {t.device}")
    if g.shape != p.shape and g.numel() != k:
        raise ValueError(f"grads[{i}] must have the weight's shape {tuple(p.shape)} or length k={k}, "
                         f"got shape {tuple(g.shape)}")


def sparse_adamw8bit_step(params: list[Tensor], grads: list[Tensor], idxs: list[Tensor], exp_avg_codes: list[Tensor],
                          exp_avg_scales: list[Tensor], exp_avg_sq_codes: list[Tensor],
                          exp_avg_sq_scales: list[Tensor], masters: list[Tensor | None] | None = None, *,
                          exp_avg_book: Tensor, exp_avg_sq_book: Tensor, step: int, lr: float, beta1: float,
                          beta2: float, eps: float, weight_decay: float) -> None:
    """The Triton kernel of lift_kernels::sparse_adamw8bit_step (semantics:
    lift_kernels.reference.sparse_adamw8bit_step). Weights that agree on weight dtype, grad dtype,
    dense or gathered grad and master or none share a launch; an optimizer bucket is one launch."""
    if masters is None:
        masters = [None] * len(params)
    m_mid = _midpoints(exp_avg_book, "exp_avg_book")
    v_mid = _midpoints(exp_avg_sq_book, "exp_avg_sq_book")
    groups: dict[tuple, list[tuple]] = {}
    for i, w in enumerate(zip(params, grads, idxs, exp_avg_codes, exp_avg_scales, exp_avg_sq_codes,
                              exp_avg_sq_scales, masters, strict=True)):
        _check(i, *w)
        p, g, idx = w[:3]
        if idx.numel() == 0:
            continue
        g = g.contiguous()
        idx = idx.to(torch.int32).contiguous()
        key = (p.device, p.dtype, g.dtype, g.shape != p.shape, w[7] is not None)
        groups.setdefault(key, []).append((p, g, idx, *w[3:]))
    scalars = _step.hyper_scalars(step, lr, beta1, beta2, eps, weight_decay)
    for (device, _, _, gathered_grad, master), weights in groups.items():
        for book in (exp_avg_book, exp_avg_sq_book):
            if book.device != device:
                raise ValueError(f"the books must be on the weights' device {device}, got {book.device}")
        table, n_blocks = _pointer_table(weights, device)
        p, g, idx, mc, ms = weights[0][:5]
        _sparse_adamw8bit_kernel[(n_blocks,)](table, p, g, idx, mc, ms, exp_avg_book, m_mid, exp_avg_sq_book, v_mid,
                                              *scalars, GATHERED_GRAD=gathered_grad, MASTER=master, BLOCK=BLOCK,
                                              num_warps=NUM_WARPS)
