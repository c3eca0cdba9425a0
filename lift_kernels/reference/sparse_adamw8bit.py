"""The sparse AdamW step with 8-bit moments: Eq. 3 on the selected entries, moments stored as codes."""
from __future__ import annotations

from torch import Tensor

from .moment_codes import dequantize_blockwise, quantize_blockwise
from .sparse_adamw import adamw_selected, step_constants


def sparse_adamw8bit_step(
    params: list[Tensor],
    grads: list[Tensor],
    idxs: list[Tensor],
    exp_avg_codes: list[Tensor],
    exp_avg_scales: list[Tensor],
    exp_avg_sq_codes: list[Tensor],
    exp_avg_sq_scales: list[Tensor],
    masters: list[Tensor | None] | None = None,
    *,
    exp_avg_book: Tensor,
    exp_avg_sq_book: Tensor,
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
) -> None:
    """As ``sparse_adamw_step``, with each moment held as uint8 codes and per-block fp32 scales
    (lift_kernels.reference.moment_codes). Per weight: read the moments back in fp32, take the fp32
    AdamW step of ``sparse_adamw_step`` (the update uses the new moments before they are rounded),
    then store the new moments' codes and scales in place."""
    if masters is None:
        masters = [None] * len(params)
    consts = step_constants(step, lr, beta1, beta2, eps, weight_decay)
    for p, g, idx, mc, ms, vc, vs, master in zip(params, grads, idxs, exp_avg_codes, exp_avg_scales,
                                                  exp_avg_sq_codes, exp_avg_sq_scales, masters, strict=True):
        if idx.numel() == 0:
            continue
        m = dequantize_blockwise(mc, ms, exp_avg_book)
        v = dequantize_blockwise(vc, vs, exp_avg_sq_book)
        adamw_selected(p, g, idx, m, v, master, consts)
        for codes, scales, value, book in ((mc, ms, m, exp_avg_book), (vc, vs, v, exp_avg_sq_book)):
            new_codes, new_scales = quantize_blockwise(value, book)
            codes.copy_(new_codes)
            scales.copy_(new_scales)
