"""Tiny models over a bitsandbytes base, quantized on the CPU, for the tests of lift_kernels.quantized."""
from __future__ import annotations

import torch
from torch import nn

KINDS = ("nf4", "fp4", "int8")


def to_bnb(linear: nn.Linear, kind: str) -> nn.Module:
    """``linear`` as a bitsandbytes Linear4bit (kind nf4 or fp4) or Linear8bitLt (int8), quantized:
    bitsandbytes quantizes a layer when it is moved to a device."""
    import bitsandbytes as bnb

    args = (linear.in_features, linear.out_features, linear.bias is not None)
    if kind == "int8":
        layer = bnb.nn.Linear8bitLt(*args, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(*args, compute_dtype=torch.float32, quant_type=kind)
    layer.load_state_dict(linear.state_dict())
    return layer.to(linear.weight.device)


class TinyQuantLM(nn.Module):
    """q_proj, an mlp of two projections and an lm_head, all bitsandbytes layers (odd sizes)."""

    def __init__(self, kind: str, seed: int = 0, d: int = 37, hidden: int = 70, vocab: int = 19):
        super().__init__()
        torch.manual_seed(seed)
        self.q_proj = to_bnb(nn.Linear(d, d), kind)
        self.mlp = nn.Module()
        self.mlp.up_proj = to_bnb(nn.Linear(d, hidden), kind)
        self.mlp.down_proj = to_bnb(nn.Linear(hidden, d, bias=False), kind)
        self.lm_head = to_bnb(nn.Linear(d, vocab, bias=False), kind)

    def forward(self, x):
        h = x + self.q_proj(x)
        h = h + self.mlp.down_proj(torch.tanh(self.mlp.up_proj(h)))
        return self.lm_head(h)

    def get_output_embeddings(self):
        return self.lm_head
