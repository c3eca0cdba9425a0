"""How a LIFT weight's Adam moments are held: fp32 vectors (``moment_bits=32``) or 8-bit codes (``8``).

With 8-bit moments each moment of the k selected entries is uint8 codes (k,) and fp32 block scales
(one per ``QBLOCK`` entries, in selection order): lift_kernels.reference.moment_codes defines the
books and the rounding, and ``ops.sparse_adamw8bit_step`` steps them. This module names the fields
of each format, holds the books on each device the optimizer steps on, and reads and writes the
moments as fp32 vectors where the optimizer needs them whole (a re-selection; state.py).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference.moment_codes import EXP_AVG_BOOK, EXP_AVG_SQ_BOOK, dequantize_blockwise, num_blocks, quantize_blockwise

MOMENT_BITS = (32, 8)
FIELDS = {32: ("exp_avg", "exp_avg_sq"),
          8: ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales")}
# (codes, scales, book) of each moment, in the op's argument order
_CODED = (("exp_avg_codes", "exp_avg_scales", 0), ("exp_avg_sq_codes", "exp_avg_sq_scales", 1))


def bits_of_state(state: dict) -> int | None:
    """The format a weight's state holds its moments in (None before its first selection)."""
    if "exp_avg_codes" in state:
        return 8
    return 32 if "exp_avg" in state else None


def check_moment_bits(value) -> int:
    if type(value) is not int or value not in MOMENT_BITS:  # 8.0 and True are not bit counts
        raise ValueError(f"moment_bits must be 32 (fp32 Adam moments) or 8 (block-wise 8-bit moments of the "
                         f"selected entries), got {value!r}")
    return value


class Books:
    """The two code books on each device, made once per device (never per step). Built from Python
    floats, so under FakeTensorMode (memory simulation) they are fake tensors like the weights."""

    def __init__(self):
        self._on: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        device = torch.device(device)
        if device not in self._on:
            self._on[device] = tuple(torch.tensor(book.tolist(), dtype=torch.float32, device=device)
                                     for book in (EXP_AVG_BOOK, EXP_AVG_SQ_BOOK))
        return self._on[device]


def coded_sizes(k: int) -> dict[str, tuple[tuple[int], torch.dtype]]:
    """Shape and dtype of each 8-bit field for k selected entries."""
    return {"exp_avg_codes": ((k,), torch.uint8), "exp_avg_scales": ((num_blocks(k),), torch.float32),
            "exp_avg_sq_codes": ((k,), torch.uint8), "exp_avg_sq_scales": ((num_blocks(k),), torch.float32)}


def encode(exp_avg: Tensor, exp_avg_sq: Tensor, books: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
    """The 8-bit fields of fp32 moments (each block's scale its largest |value|, codes rounded)."""
    out = {}
    for (codes, scales, b), value in zip(_CODED, (exp_avg, exp_avg_sq)):
        out[codes], out[scales] = quantize_blockwise(value, books[b])
    return out


def decode(state: dict, books: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """fp32 (exp_avg, exp_avg_sq) as the 8-bit fields read back."""
    return tuple(dequantize_blockwise(state[codes], state[scales], books[b]) for codes, scales, b in _CODED)
