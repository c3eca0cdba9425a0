"""The 8-bit moment codes (lift_kernels.reference.moment_codes) and the reference 8-bit step."""
from __future__ import annotations

import pytest
import torch

import lift_kernels as lk
from lift_kernels.reference.moment_codes import (EXP_AVG_BOOK, EXP_AVG_SQ_BOOK, QBLOCK, dequantize_blockwise,
                                                 midpoints, num_blocks, quantize_blockwise)

HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)


def test_books_hold_zero_one_and_no_zero_for_the_second_moment():
    assert EXP_AVG_BOOK.dtype == EXP_AVG_SQ_BOOK.dtype == torch.float32
    assert (EXP_AVG_BOOK == 0).sum() == 1 and EXP_AVG_BOOK.max() == 1.0 and EXP_AVG_BOOK.min() > -1.0
    assert EXP_AVG_SQ_BOOK.min() == pytest.approx(1e-7) and EXP_AVG_SQ_BOOK.max() == 1.0


@pytest.mark.parametrize("k", [1, 255, 256, 257, 1000])
def test_round_trip_is_nearest_code_times_block_max(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(k, generator=g) * torch.rand(k, generator=g) ** 6
    codes, scales = quantize_blockwise(x, EXP_AVG_BOOK)
    assert codes.dtype == torch.uint8 and codes.shape == (k,) and scales.shape == (num_blocks(k),)
    block = torch.arange(k) // QBLOCK
    assert torch.equal(scales, torch.stack([x[block == b].abs().max() for b in range(num_blocks(k))]))
    back = dequantize_blockwise(codes, scales, EXP_AVG_BOOK)
    # nearest: no other book value is closer to x / scale than the chosen one
    r = x / scales[block]
    err = (EXP_AVG_BOOK[codes.long()] - r).abs()
    assert bool((err[:, None] <= (EXP_AVG_BOOK[None, :] - r[:, None]).abs() + 1e-7).all())
    # each block's largest positive entry is read back exactly
    for b in range(num_blocks(k)):
        top = x[block == b].abs().argmax()
        if x[block == b][top] > 0:
            assert back[block == b][top] == x[block == b][top]


def test_ties_go_to_the_lower_code_and_zero_blocks_read_back_zero():
    mids = midpoints(EXP_AVG_SQ_BOOK)
    x = torch.cat([torch.ones(1), mids[:10]])  # scale 1: each value sits on a midpoint
    codes, _ = quantize_blockwise(x, EXP_AVG_SQ_BOOK)
    assert codes[1:].tolist() == list(range(10))
    codes, scales = quantize_blockwise(torch.zeros(300), EXP_AVG_BOOK)
    assert torch.equal(dequantize_blockwise(codes, scales, EXP_AVG_BOOK), torch.zeros(300))
    assert bool((EXP_AVG_BOOK[codes.long()] == 0).all())


def test_second_moment_never_reads_back_zero_beside_a_large_one():
    v = torch.tensor([1.0, 1e-9, 3e-5])  # 1e-9 is below the book: read back as 1e-7, never 0
    back = dequantize_blockwise(*quantize_blockwise(v, EXP_AVG_SQ_BOOK), EXP_AVG_SQ_BOOK)
    assert back[1] == pytest.approx(1e-7) and abs(back[2] / 3e-5 - 1) < 0.033


def _codes_of_zero(k):
    mc, ms = quantize_blockwise(torch.zeros(k), EXP_AVG_BOOK)
    vc, vs = quantize_blockwise(torch.zeros(k), EXP_AVG_SQ_BOOK)
    return mc, ms, vc, vs


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_first_step_equals_the_fp32_step(dtype):
    """From zero moments the first step uses the new moments before rounding: it is the fp32 step."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 29, generator=g).to(dtype)
    idx = torch.randperm(37 * 29, generator=g)[:300].sort().values.int()
    grad = torch.randn(37, 29, generator=g).to(dtype)
    w32, m32, v32 = w.clone(), torch.zeros(300), torch.zeros(300)
    mc, ms, vc, vs = _codes_of_zero(300)
    lk.sparse_adamw8bit_step([w], [grad], [idx], [mc], [ms], [vc], [vs], exp_avg_book=EXP_AVG_BOOK,
                             exp_avg_sq_book=EXP_AVG_SQ_BOOK, step=1, **HP)
    lk.sparse_adamw_step([w32], [grad], [idx], [m32], [v32], step=1, **HP)
    assert torch.equal(w, w32)
    assert torch.equal(dequantize_blockwise(mc, ms, EXP_AVG_BOOK), dequantize_blockwise(
        *quantize_blockwise(m32, EXP_AVG_BOOK), EXP_AVG_BOOK))
    untouched = torch.ones(37 * 29, dtype=torch.bool)
    untouched[idx.long()] = False
    assert torch.equal(w.view(-1)[untouched], w32.view(-1)[untouched])


def test_trajectory_stays_near_fp32_moments():
    """Fifty steps on a quadratic: the 8-bit moments' weights stay within a few percent of the
    distance the fp32 moments' weights travel."""
    g = torch.Generator().manual_seed(1)
    target = torch.randn(64, 48, generator=g)
    idx = torch.randperm(64 * 48, generator=g)[:700].sort().values.int()
    w8, w32 = torch.zeros(64, 48), torch.zeros(64, 48)
    m32, v32 = torch.zeros(700), torch.zeros(700)
    mc, ms, vc, vs = _codes_of_zero(700)
    for t in range(1, 51):
        noise = 0.1 * torch.randn(64, 48, generator=g)
        lk.sparse_adamw8bit_step([w8], [w8 - target + noise], [idx], [mc], [ms], [vc], [vs],
                                 exp_avg_book=EXP_AVG_BOOK, exp_avg_sq_book=EXP_AVG_SQ_BOOK, step=t, **HP)
        lk.sparse_adamw_step([w32], [w32 - target + noise], [idx], [m32], [v32], step=t, **HP)
    travelled = w32.norm()
    assert travelled > 0.5 * 50 * 1e-3 * 700**0.5
    assert (w8 - w32).norm() / travelled < 0.05
