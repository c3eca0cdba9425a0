"""The weight gradient of a linear layer at chosen entries only (SDDMM): LIFT over a quantized base."""
from __future__ import annotations

import torch
from torch import Tensor

# Elements of one chunk's gathered (T, chunk) operands: bounds the temporaries whatever k and T are.
CHUNK_ELEMENTS = 1 << 22


def sampled_weight_grad(grad_out: Tensor, x: Tensor, idx: Tensor) -> Tensor:
    """``(grad_out.T @ x).flatten()[idx]`` without forming the (m, n) product.

    grad_out is (T, m), x is (T, n), idx int32 flat indices (row * n + col) into m * n. Each value is
    the sum over t of grad_out[t, row] * x[t, col], accumulated in fp32 whatever the inputs' dtype.
    Works over chunks of idx so the gathered columns never exceed CHUNK_ELEMENTS elements.
    """
    n = x.shape[1]
    k = idx.numel()
    out = torch.zeros(k, dtype=torch.float32, device=grad_out.device)
    if k == 0 or x.shape[0] == 0:
        return out
    g32, x32 = grad_out.float(), x.float()
    chunk = max(1, CHUNK_ELEMENTS // x.shape[0])
    flat = idx.long()
    for start in range(0, k, chunk):
        part = flat[start:start + chunk]
        rows, cols = part // n, part % n
        out[start:start + chunk] = (g32.index_select(1, rows) * x32.index_select(1, cols)).sum(0)
    return out
