"""8-bit codes for Adam's moments of the selected entries: block-wise scaled, non-linear code books.

A weight's k moments (in selection order) are cut into blocks of ``QBLOCK`` entries. Each block keeps
one fp32 scale, the largest |value| in it, and each entry one uint8 code: the index of the code-book
value nearest to ``value / scale``. The value read back is ``book[code] * scale``. Every backend of
``sparse_adamw8bit_step`` uses these books (passed to it as tensors) and this rounding rule, so they
store the same codes up to the rounding of the fp32 AdamW arithmetic before it.

Two books, with the care for small values that the second moment needs:

- ``exp_avg`` (signed): a dynamic-exponent book as in block-wise 8-bit Adam: a sign, then seven
  decades of magnitude where the top decade [0.1, 1] gets most codes (64 bins), each lower decade
  half as many. Zero and 1.0 are exact, so a block's largest positive entry is read back exactly.
- ``exp_avg_sq`` (unsigned): 256 log-spaced values from 1e-7 to 1, with no zero. The update divides
  by sqrt(v): a v that rounded to zero while its m did not would step by m / eps, an explosion. Here
  the smallest v read back is 1e-7 of its block's largest, and every v is held to within 3.3% (its
  square root to 1.7%), evenly over seven decades.

Rounding: ``code = #{midpoints < r}`` with ``r = value / scale`` clamped to [-1, 1] and the
midpoints ``(book[i] + book[i+1]) * 0.5`` computed in fp32: nearest, ties to the lower code. A block
whose scale is 0 reads back 0 whatever its codes.
"""
from __future__ import annotations

import torch
from torch import Tensor

QBLOCK = 256  # entries per scale: the scales cost 4/QBLOCK bytes per entry and moment


def _signed_book() -> Tensor:
    positive = []
    for level in range(7):  # decade 10^(level-6) gets 2^level bins of [0.1, 1] scaled into it
        bins = 2**level
        edges = torch.linspace(0.1, 1.0, bins + 1, dtype=torch.float64)
        positive.append((edges[:-1] + edges[1:]) / 2 * 10.0 ** (level - 6))
    positive = torch.cat(positive)  # 127 values in (0, 1)
    book = torch.cat([-positive.flip(0), torch.zeros(1, dtype=torch.float64), positive,
                      torch.ones(1, dtype=torch.float64)])
    return book.float()


def _unsigned_book() -> Tensor:
    return torch.logspace(-7.0, 0.0, 256, dtype=torch.float64).float()


EXP_AVG_BOOK = _signed_book()
EXP_AVG_SQ_BOOK = _unsigned_book()
assert EXP_AVG_BOOK.numel() == 256 and bool((EXP_AVG_BOOK.diff() > 0).all())
assert EXP_AVG_SQ_BOOK.numel() == 256 and bool((EXP_AVG_SQ_BOOK.diff() > 0).all())
assert EXP_AVG_BOOK[-1].item() == 1.0 and EXP_AVG_SQ_BOOK[-1].item() == 1.0


def num_blocks(k: int) -> int:
    return (k + QBLOCK - 1) // QBLOCK


def midpoints(book: Tensor) -> Tensor:
    return (book[:-1] + book[1:]) * 0.5


def quantize_blockwise(x: Tensor, book: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 vector (k,) -> (uint8 codes (k,), fp32 scales (ceil(k / QBLOCK),))."""
    x = x.float()
    k = x.numel()
    pad = num_blocks(k) * QBLOCK - k
    blocks = torch.nn.functional.pad(x, (0, pad)).view(-1, QBLOCK)
    scales = blocks.abs().amax(dim=1)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    r = (blocks / safe[:, None]).clamp_(-1.0, 1.0).reshape(-1)[:k]
    codes = torch.searchsorted(midpoints(book.to(x.device)), r, right=False)
    return codes.to(torch.uint8), scales


def dequantize_blockwise(codes: Tensor, scales: Tensor, book: Tensor) -> Tensor:
    """(uint8 codes (k,), fp32 scales) -> fp32 vector (k,)."""
    k = codes.numel()
    values = book.to(codes.device).index_select(0, codes.long())
    block_scale = scales.repeat_interleave(QBLOCK)[:k]
    return values * block_scale
