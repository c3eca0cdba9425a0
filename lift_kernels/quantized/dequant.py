"""The float matrix a bitsandbytes linear holds, read back with bitsandbytes' own functions.

bitsandbytes is imported only here and only once a bnb layer exists: a module can be a bnb layer only
if bitsandbytes was imported, so ``bnb_kind`` looks in sys.modules instead of importing it.
"""
from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

KINDS = ("4bit", "8bit")
_MOVE_FIX = ("bitsandbytes quantizes a layer when it is moved to a device: call base.to('cpu') or "
             "base.to('cuda') (or load the model with a BitsAndBytesConfig) before wrapping it")


def bnb_kind(module: nn.Module) -> str | None:
    """"4bit" for a bitsandbytes.nn.Linear4bit (NF4 or FP4), "8bit" for a Linear8bitLt, else None."""
    bnb = sys.modules.get("bitsandbytes")
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def _scales_8bit(base: nn.Module) -> Tensor | None:
    # bnb keeps the row scales on the weight until the layer's first forward, then on its state
    scb = getattr(base.weight, "SCB", None)
    return scb if scb is not None else getattr(base.state, "SCB", None)


def check_quantized(base: nn.Module, kind: str) -> None:
    """ValueError, with the fix, if the bnb layer ``base`` holds no quantized weight yet."""
    w = base.weight
    if kind == "4bit" and getattr(w, "quant_state", None) is None:
        raise ValueError(f"LIFTQuantLinear: base (a Linear4bit) is not quantized yet; {_MOVE_FIX}")
    if kind == "8bit":
        if w.dtype != torch.int8:
            raise ValueError(f"LIFTQuantLinear: base (a Linear8bitLt) holds {w.dtype} weights, not int8 ones "
                             f"(has_fp16_weights=True, or not quantized yet); build it with has_fp16_weights=False "
                             f"and {_MOVE_FIX}")
        if _scales_8bit(base) is None:
            raise ValueError("LIFTQuantLinear: base (a Linear8bitLt) has int8 weights but no row scales (SCB); "
                             f"load its state_dict again or {_MOVE_FIX}")


def dequantize(base: nn.Module, kind: str) -> Tensor:
    """A new fp32 (out_features, in_features) tensor: the weight the bnb layer ``base`` computes with."""
    import bitsandbytes.functional as bnb_functional

    w = base.weight
    if kind == "4bit":
        W = bnb_functional.dequantize_4bit(w.data, w.quant_state)
    else:
        W = bnb_functional.int8_vectorwise_dequant(w.data, _scales_8bit(base))
    return W.to(torch.float32).reshape(base.out_features, base.in_features)
