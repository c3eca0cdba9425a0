"""LIFTQuantLinear: a frozen bitsandbytes linear plus a trainable sparse fp32 delta.

The layer computes with W = dequant(base) + delta scattered at ``positions``. Its backward forms the
delta's gradient only at the ``selected`` slots (an SDDMM, ops.sampled_weight_grad), never the
dense (out, in) weight gradient, and saves the input rather than W (W is recomputed from the base).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .dequant import bnb_kind, check_quantized, dequantize
from .positions import check_positions, union
from .registry import register


def _resize(p: nn.Parameter, data: Tensor) -> None:
    """Give ``p`` new data of another size, keeping the Parameter (optimizers hold it).

    A leaf's gradient accumulator records the leaf's shape when made, and a graph still alive (the
    previous step's ``loss``) keeps it alive, so the next backward would check the new gradient
    against the old shape. Assigning (empty) data of another dtype first makes autograd drop that accumulator
    (set_data does so when the type changes); the next forward makes one of the new shape."""
    p.data = data.new_empty(0, dtype=torch.float64 if data.dtype != torch.float64 else torch.float32)
    p.data = data


class _SparseDeltaLinear(torch.autograd.Function):
    """y = x @ module.effective_weight().T; gradients for x and for module.delta."""

    @staticmethod
    def forward(ctx, x: Tensor, delta: Tensor, module: LIFTQuantLinear) -> Tensor:
        ctx.module = module
        ctx.save_for_backward(x)
        return F.linear(x, module.effective_weight(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (x,) = ctx.saved_tensors
        module = ctx.module
        grad_x = grad_delta = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ module.effective_weight(grad_out.dtype)
        if ctx.needs_input_grad[1]:
            grad_delta = module.delta_grad(grad_out.reshape(-1, module.out_features),
                                           x.reshape(-1, module.in_features))
        return grad_x, grad_delta, None


class LIFTQuantLinear(nn.Module):
    """A bitsandbytes Linear4bit (NF4 or FP4) or Linear8bitLt, frozen, plus a trainable sparse delta.

    ``delta`` (fp32, (U,)) holds the delta's values at ``positions`` (int32, (U,), strictly
    increasing flat indices row * in_features + col); both start empty and grow() adds positions.
    ``selected`` (int32 sorted slots into ``delta``, or None for every slot) says where backward forms
    the delta's gradient; it is runtime state, not saved (LIFTAdamW sets it).
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        kind = bnb_kind(base)
        if kind is None:
            raise TypeError(
                f"LIFTQuantLinear: base must be a bitsandbytes.nn.Linear4bit (NF4 or FP4) or "
                f"bitsandbytes.nn.Linear8bitLt, got {type(base).__module__}.{type(base).__qualname__}; "
                "for a full-precision nn.Linear train its weight with LIFTAdamW directly (lift_param_groups)")
        check_quantized(base, kind)
        for p in base.parameters(recurse=False):
            p.requires_grad_(False)
        self.kind = kind
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        self.delta = nn.Parameter(torch.zeros(0, dtype=torch.float32, device=device))
        self.register_buffer("positions", torch.zeros(0, dtype=torch.int32, device=device))
        self.selected: Tensor | None = None
        register(self)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def delta_size(self) -> int:
        return self.delta.numel()

    def dequantized(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The base's weight as a new (out_features, in_features) tensor of ``dtype``."""
        return dequantize(self.base, self.kind).to(dtype)

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """dequant(base) + delta at positions, summed in fp32 then cast: the weight the layer computes
        with. Differentiable with respect to ``delta``."""
        W = dequantize(self.base, self.kind)
        if self.delta.numel():
            W.view(-1).index_add_(0, self.positions, self.delta)  # int32 indices: no int64 copy per call
        return W.to(dtype)

    def delta_grad(self, grad_out: Tensor, x: Tensor) -> Tensor:
        """The gradient of ``delta`` (fp32, (U,)) for 2-D grad_out (T, out) and x (T, in): formed at
        the selected slots, zero at the others."""
        slots = self.selected
        if slots is None or slots.numel() == self.delta.numel():  # sorted, distinct: every slot
            return ops.sampled_weight_grad(grad_out, x, self.positions)
        values = ops.sampled_weight_grad(grad_out, x, self.positions.index_select(0, slots))
        return torch.zeros_like(self.delta).index_add_(0, slots, values)

    def forward(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            raise TypeError(f"LIFTQuantLinear: x must be a floating tensor, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"LIFTQuantLinear: x's last dimension must be in_features={self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        y = _SparseDeltaLinear.apply(x, self.delta, self)
        bias = self.base.bias
        return y if bias is None else y + bias.to(y.dtype)

    @torch.no_grad()
    def grow(self, new_positions: Tensor) -> tuple[Tensor, Tensor]:
        """Adds ``new_positions`` (int32, sorted, unique) to the delta's positions.

        Returns (slots, old_to_new): where each new position sits in the grown delta (int32, sorted)
        and where each old slot went (int64, (old U,)). ``delta`` and ``positions`` keep their objects
        (their .data is replaced): old values move to their new slots, new entries start at 0.0; a
        gradient moves with them. Clears ``selected``.
        """
        check_positions(new_positions, self.in_features * self.out_features, self.positions.device)
        positions, slots, old_to_new = union(self.positions, new_positions)
        _resize(self.delta, self._moved(self.delta.data, old_to_new, positions.numel()))
        if self.delta.grad is not None:
            self.delta.grad = self._moved(self.delta.grad, old_to_new, positions.numel())
        self.positions.data = positions
        self.selected = None
        return slots, old_to_new

    @staticmethod
    def _moved(values: Tensor, old_to_new: Tensor, size: int) -> Tensor:
        out = values.new_zeros(size)
        out[old_to_new] = values
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint's delta may be of another size than this module's (a resumed or applied run):
        # take its size, so that the copy below does not fail on the shapes.
        delta, positions = state_dict.get(prefix + "delta"), state_dict.get(prefix + "positions")
        if delta is not None and positions is not None:
            if delta.dim() != 1 or positions.shape != delta.shape:
                error_msgs.append(f"{prefix}delta and {prefix}positions must be 1-D of one length, got "
                                  f"{tuple(delta.shape)} and {tuple(positions.shape)}")
                return
            _resize(self.delta, self.delta.data.new_zeros(delta.shape))
            self.delta.grad = None
            self.positions.data = self.positions.data.new_zeros(positions.shape)
            self.selected = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if positions is not None:
            try:
                check_positions(self.positions, self.in_features * self.out_features, self.positions.device)
            except ValueError as exc:
                error_msgs.append(f"{prefix}positions: {exc}")
        register(self)  # load_state_dict(assign=True) gives the module a new delta

    def __setstate__(self, state):
        super().__setstate__(state)
        register(self)  # a copy (deepcopy, pickle) owns its own delta

    def extra_repr(self) -> str:
        return f"kind={self.kind}, in_features={self.in_features}, out_features={self.out_features}, U={self.delta_size}"
