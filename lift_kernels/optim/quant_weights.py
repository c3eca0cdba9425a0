"""How LIFTAdamW trains the sparse delta of a quantized base (lift_kernels.quantized.LIFTQuantLinear).

Such a LIFT weight is the layer's ``.delta`` Parameter: the fp32 values of the entries the run has
trained so far (their flat indices in the layer's ``positions``), over a frozen 4-bit or 8-bit
bitsandbytes weight. To the optimizer it is a weight whose shape is the layer's (m, n):

- its budget and its selection come from that matrix, scored on ``effective_weight()`` (the
  dequantized base plus the delta: the weight the model computes with);
- a selection is installed by growing the delta to the union of its entries and the selection
  (``grow``: entries that leave the selection keep what they learned, as in Algorithm 1) and
  storing the selection as *slots* of the delta: from then on ``state["idx"]`` addresses
  ``p.data`` and the step kernels update it as any weight's entries;
- selections are made in the layer's forward pre-hook, before the first forward of the step they
  are due for: the backward then forms the delta's gradient only at the selected slots, and the
  delta never grows while a backward that holds it is pending.
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..quantized.registry import quant_owner
from .gathered_grad import GatheredGrad


def owner(p: Tensor):
    """The LIFTQuantLinear whose delta ``p`` is, or None."""
    return quant_owner(p)


def is_quant(p: Tensor) -> bool:
    return owner(p) is not None


def matrix_shape(p: Tensor) -> tuple[int, ...]:
    """The shape of the matrix that LIFT weight ``p`` trains: the layer's (m, n) for a delta."""
    layer = owner(p)
    return tuple(layer.matrix_shape) if layer is not None else tuple(p.shape)


def matrix_numel(p: Tensor) -> int:
    m, n = matrix_shape(p)
    return m * n


def selection_matrix(p: Tensor) -> Tensor:
    """What a selection of ``p`` scores: the weight itself, or the quantized layer's effective weight."""
    layer = owner(p)
    return layer.effective_weight() if layer is not None else p


def check_quant_param(p: Tensor, name: str, group: dict, needs_grad: bool) -> None:
    """The options a quantized base's delta cannot take, refused when its group is added."""
    if p.dtype != torch.float32 or p.dim() != 1:
        raise ValueError(f"{name} (a quantized layer's delta) must be a 1-D fp32 tensor, got {p.dtype} "
                         f"of shape {tuple(p.shape)}; do not convert LIFTQuantLinear.delta")
    if float(group["weight_decay"]) != 0.0:
        raise ValueError(f"weight_decay={group['weight_decay']} cannot apply to {name}: the frozen quantized "
                         "base would have to decay too; use weight_decay=0 for quantized layers (or put "
                         "them in a group of their own with weight_decay=0)")
    if needs_grad:
        raise ValueError(f"selector={group['selector']!r} scores the dense gradient, which a quantized layer "
                         f"never forms ({name}); use selector 'lift', 'magnitude' or 'random'")
    if group["master_weights"]:
        raise ValueError(f"master_weights=True does not apply to {name}: a quantized layer's delta is fp32 "
                         "already; leave master_weights unset (None) or False")


def install_forward_hook(opt, p: Tensor, handles: list) -> None:
    """Before each forward of p's layer, let ``opt`` select p if due and show the layer its selection.
    The hook holds the optimizer and the weight weakly (a deleted optimizer stops acting)."""
    opt_ref, p_ref = weakref.ref(opt), weakref.ref(p)

    def before_forward(layer, args):
        o, q = opt_ref(), p_ref()
        if o is not None and q is not None:
            o._before_quant_forward(q, layer)

    handles.append(owner(p).register_forward_pre_hook(before_forward))


@torch.no_grad()
def install_quant_selection(state: dict, p: Tensor, new_idx: Tensor, install, counting: Counting) -> None:
    """Grow p's delta to hold the selection ``new_idx`` (flat indices of its matrix), renumber the old
    selection's slots, then ``install(slots)`` (state.install_selection, which carries the moments
    from the old slots to the new ones). A gradient left from before (zero_grad(set_to_none=False))
    must be zero: it is dropped, since the delta changes size."""
    layer, g = owner(p), p.grad
    if g is not None and (g.values if isinstance(g, GatheredGrad) else g).count_nonzero():
        raise RuntimeError("a quantized layer's delta still holds a gradient when its selection changes "
                           "(nothing was changed); call zero_grad() after every step()")
    p.grad = None
    slots, old_to_new = layer.grow(new_idx.to(torch.int32))
    if "idx" in state:
        state["idx"] = old_to_new.index_select(0, state["idx"].long()).to(torch.int32)
    install(slots)
    if slots.numel() == p.numel():
        # the selection is the whole delta (always so until a re-selection adds entries): its slots
        # are 0..U-1, a view of one arange shared by every layer instead of 4 bytes per entry each
        state["idx"] = counting(slots.numel(), slots.device)
    state["shape"] = matrix_shape(p)
    layer.selected = state["idx"]


class Counting:
    """int32 0..n-1 as views of one tensor per device (grown by doubling; a view never changes), held
    by one optimizer (so a simulated run's fake tensor dies with its optimizer). torch.save writes a
    shared storage once, so checkpoints hold it once too."""

    def __init__(self):
        self._have: dict[torch.device, Tensor] = {}

    def __call__(self, n: int, device: torch.device) -> Tensor:
        have = self._have.get(device)
        if have is None or have.numel() < n:
            size = max(n, 2 * have.numel() if have is not None else 0)
            have = self._have[device] = torch.arange(size, dtype=torch.int32, device=device)
        return have[:n]
