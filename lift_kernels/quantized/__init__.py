"""LIFT over a bitsandbytes-quantized base: the base stays 4-bit or 8-bit and frozen, a sparse fp32
delta at chosen positions is what trains (issue 20).

- linear.py: LIFTQuantLinear, the wrapper of one bnb linear, and its autograd Function;
- positions.py: the checks and the union of grow();
- dequant.py: what bitsandbytes holds, read back as a float matrix;
- registry.py: quant_owner, from a delta to its module;
- wrap.py: quantize_for_lift, which wraps a model's bnb linears in place.

bitsandbytes stays optional: nothing here imports it until a bnb layer is wrapped.
"""
from .linear import LIFTQuantLinear
from .registry import quant_owner
from .wrap import quantize_for_lift

__all__ = ["LIFTQuantLinear", "quant_owner", "quantize_for_lift"]
